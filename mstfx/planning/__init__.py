"""Cost model and planner: sympy bytes of a training step as a function of S, B and M
(:mod:`.cost_model`), and the choice of mode and M per region for a memory budget (:mod:`.planner`),
for the training step a :class:`~mstfx.planning.setup.TrainingSetup` describes (:mod:`.setup`)."""

__all__ = ["TrainingSetup"]


def __getattr__(name: str):
    # imported on first use, so importing a planning module (``mstfx plan --help``) stays light
    if name == "TrainingSetup":
        from .setup import TrainingSetup

        return TrainingSetup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
