"""Domain services: they take a session and collaborators, never Flask or Celery."""
