"""msdnet-serve: the HTTP service around an MSDNet checkpoint (see server.http.app)."""
