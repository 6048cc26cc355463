"""How the router finds its workers: the Discovery contract (base.py) and its sources,
a static list (static.py) and the Kubernetes API (kubernetes.py)."""
