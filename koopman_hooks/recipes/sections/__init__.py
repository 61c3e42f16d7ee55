"""Recipe sections: fidelity (always), ``[topology]`` and ``[unlearning]``, in report order."""

from koopman_hooks.recipes.sections.base import RunContext, Section
from koopman_hooks.recipes.sections.fidelity import Fidelity
from koopman_hooks.recipes.sections.topology import Topology
from koopman_hooks.recipes.sections.unlearning import Unlearning

SECTIONS: tuple[Section, ...] = (Fidelity(), Topology(), Unlearning())

__all__ = ["SECTIONS", "RunContext", "Section"]
