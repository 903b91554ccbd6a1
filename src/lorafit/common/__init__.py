"""The bottom of lorafit: what every other part may use and which uses nothing of lorafit.

* :mod:`~lorafit.common.errors`: ``LorafitError`` and its kinds (one line, an exit status).
* :mod:`~lorafit.common.files`: atomic writes, JSON beside runs, atomic directory swaps.
* :mod:`~lorafit.common.matching`: the one target-name rule (list, regex, rank/alpha patterns).
* :mod:`~lorafit.common.modules`: the one module walker and the one parameter counter.
"""
