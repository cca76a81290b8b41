"""reembed: the library that the producer, the workers and the search all speak.

Move a Chroma collection from one embedding model to another through Redis and Celery
workers, while search keeps serving from whichever collection is complete.
"""

__version__ = "0.1.0"
