"""Model names: the constellation, each mode, and each specialist alone, as OpenAI ``model`` ids.

vLLM and LoRAX serve an adapter under its own model name; here the names a request may send are

    <served>            the constellation in its default mode (``composition`` may choose another)
    <served>/<mode>     that composition mode, e.g. ``constellation/paper``, ``constellation/generalist``
    <specialist>        that specialist alone: mode ``routed`` to it (``composition.specialist``)

so a harness that cannot send extra body fields can still pick a mode or a specialist. A name fixes
what it names: a request's ``composition`` may add the mode's other parameters (``top_k`` with
``constellation/paper``), but a ``composition.mode`` or ``composition.specialist`` that disagrees
with the name is a 400. Were a specialist named like the served name, the served name wins
(the specialist stays reachable through ``composition``). Pure Python: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from composer.modes import CompositionParams


@dataclass(frozen=True)
class ServedName:
    """What a ``model`` id runs: ``mode`` None is the default mode, left to the request's composition."""

    id: str
    mode: str | None = None
    specialist: str | None = None
    base: str = ""  # the served name

    @property
    def parent(self) -> str | None:
        """``/v1/models``' ``parent``: a mode's is the constellation, a specialist's the generalist
        (served alone as ``<served>/generalist``)."""
        return None if self.mode is None else self.base + ("/generalist" if self.specialist else "")


def served_names(model_name: str, modes, domains: list[str]) -> dict[str, ServedName]:
    """Every name this server answers to, in ``/v1/models``' order: the constellation, its modes, its
    specialists (a name taken by an earlier entry is not repeated)."""
    names = {model_name: ServedName(model_name, base=model_name)}
    for m in modes:
        names.setdefault(f"{model_name}/{m}", ServedName(f"{model_name}/{m}", m, base=model_name))
    for d in domains:
        names.setdefault(d, ServedName(d, "routed", d, base=model_name))
    return names


class NameConflict(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def apply_name(params: CompositionParams, name: ServedName) -> CompositionParams:
    """The request's composition with what its model name fixes; a disagreement is ``NameConflict``."""
    if name.mode is None:
        return params
    if params.mode is not None and params.mode != name.mode:
        what = f"specialist '{name.specialist}' alone (mode 'routed')" if name.specialist else f"mode '{name.mode}'"
        raise NameConflict(f"model '{name.id}' runs {what}, but composition.mode is '{params.mode}'; name the mode in "
                           f"one place (model '{name.base}' with composition.mode, or model "
                           f"'{name.base}/{params.mode}')", "composition.mode")
    if name.specialist and params.specialist is not None and params.specialist != name.specialist:
        raise NameConflict(f"model '{name.id}' runs specialist '{name.specialist}', but composition.specialist "
                           f"is '{params.specialist}'", "composition.specialist")
    fixed = {"mode": name.mode}
    if name.specialist:
        fixed["specialist"] = name.specialist
    return params.model_copy(update=fixed)
