"""Scaling out: microserve replicas on Ray Serve behind a prefix- and load-aware router.

``prefix`` and ``policy`` are pure Python (the simulator in ``bench/router_sim.py`` uses them too); ``router`` and
``ray_app`` need the ``ray`` extra and import Ray only when used.
"""
