"""msdnet-serve: the HTTP service around an MSDNet checkpoint (see server.app)."""
