"""HTTP layer: parse with marshmallow, call a service, dump; one error envelope."""

from __future__ import annotations

from flask import Flask


def register_api(app: Flask) -> None:
    from app.api import deliveries, errors, events, health, openapi, organization, plumbing, tasks

    plumbing.init_app(app)
    errors.init_app(app)
    app.register_blueprint(tasks.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(deliveries.bp)
    app.register_blueprint(organization.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
