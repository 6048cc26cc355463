"""Discrete-event simulation of a pdserve cluster (model.py: service times fitted from
`pdserve bench`; engine.py: the simulator; results.py: its metrics; study.py: routing
policies and P:D ratios at scale)."""
