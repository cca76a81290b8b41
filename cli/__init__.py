"""The `reembed` command line: composes the producer, the workers and the search."""
