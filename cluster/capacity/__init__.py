"""Capacity planning for deletion pipelines (issue 5).

`workload` (request streams), `costs` (profiles and cost tables), `simulate` (the
discrete-event simulation) and `report` (rows and tables) are pure; `profile` measures
a machine, and `commands` wires `unlearn profile` and `unlearn plan`.
"""
