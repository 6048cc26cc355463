"""Worker code shared by the prefill, decode and colocated roles."""
