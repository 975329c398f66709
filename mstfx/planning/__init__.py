"""Cost model and planner: sympy bytes of a training step as a function of S, B and M
(:mod:`.cost_model`), and the choice of mode and M per region for a memory budget (:mod:`.planner`)."""
