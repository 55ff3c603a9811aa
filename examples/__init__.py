"""Examples of an application's side of rq-reconciler (see examples/README.md)."""
