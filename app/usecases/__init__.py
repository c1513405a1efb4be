"""Use cases: one module per verb, each owning its transaction and its effects.

A view parses, calls a use case, and represents what it returns; a Celery
task loads an id and calls a use case. The use case opens a
:class:`~app.usecases.unit_of_work.UnitOfWork`, calls the domain services
(:mod:`app.services`) inside it, and registers what must happen after the
commit (enqueue, publish, release, revoke, notify) through the dispatch seam
(:class:`app.dispatch.Dispatch`): effects run only after a successful commit.
"""
