"""``prmigrate demo``: the end-to-end demonstration.

``cluster.py`` starts and stops the processes (target, host daemons),
``guest.py`` is the guest (stamped writes verified by ``stamp.py``),
``observer.py`` reads READ FULL STATUS and probes fencing on the shared
target, ``scenario.py`` runs the moves and the checks, ``report.py`` prints.
"""
