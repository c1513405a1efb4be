"""Worker entry point: ``celery -A workers.main worker``."""

from app import create_app

celery = create_app().extensions["celery"]
