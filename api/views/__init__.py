"""One blueprint per resource. Views are thin: parse and validate, call the store, shape."""
