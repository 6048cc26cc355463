"""SLO-driven autoscaling: signals from the router's metrics (signals.py), the decision
(policy.py), the backends that resize pools (scaler.py) and the loop (loop.py)."""
