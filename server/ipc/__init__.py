"""Front end and engine in separate processes: the wire format, the engine process and its client."""
