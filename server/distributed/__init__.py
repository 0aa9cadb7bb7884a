"""Scale-out over Ray Serve: ``python -m server.distributed --num-replicas N [flags of the single server]``.

An ingress deployment forwards each request to one of N engine replicas, each running the single server's
OpenAI app over its own engine, picked by prompt-prefix affinity (``server.distributed.app`` explains the
design). Ray is an optional dependency (``pip install 'jetmoe-serve[ray]'``): only ``cli`` and the modules it
imports work without it.
"""
