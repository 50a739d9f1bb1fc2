"""Which modules of a causal LM a pipeline part holds, found by the model's own structure.

A part is a range of decoder layers, plus the input embedding (stage 0) and/or the final norm
and LM head (the head). :func:`locate_parts` names the modules behind each piece, from
``base_model_pp_plan`` where transformers declares one, else from the adapter's structural
discovery; :func:`restrict` swaps every module a part does not hold for a :class:`NotHeld`
placeholder that has no parameters and raises if called.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sedac_ray.model.adapter import ModelAdapter, NotHeld, ReleasedLayer, UnsupportedArchitecture


@dataclass(frozen=True)
class ModelPart:
    """Decoder layers ``layers`` (0-based, contiguous), plus the input embedding (and whatever the
    pipeline-parallel plan puts before the layers) when ``embed``, and the final norm and LM head
    (whatever comes after the layers) when ``head``."""

    layers: range
    embed: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.layers, range) or self.layers.step != 1:
            raise ValueError(f"ModelPart.layers must be a contiguous range, got {self.layers!r}")
        if self.layers.start < 0:
            raise ValueError(f"ModelPart.layers must start at 0 or later, got {self.layers!r}")
        if not (len(self.layers) or self.embed or self.head):
            raise ValueError("ModelPart holds nothing: give it layers, embed=True or head=True")

    @classmethod
    def whole(cls, num_layers: int) -> ModelPart:
        return cls(range(num_layers), embed=True, head=True)

    def check_fits(self, num_layers: int) -> None:
        if self.layers.stop > num_layers:
            raise ValueError(f"ModelPart.layers {self.layers!r} goes beyond the model's {num_layers} layers")


@dataclass(frozen=True)
class PartModules:
    """Dotted module names (relative to the causal LM) of each piece."""

    layers: str  # the ModuleList of decoder layers
    before: tuple[str, ...]  # the input embedding and anything else run before the layers
    after: tuple[str, ...]  # the final norm and anything else run after the layers
    head: str  # the LM head


def locate_parts(model: nn.Module) -> PartModules:
    """Name the modules of each piece of ``model`` (built on any device, meta included)."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if id(decoder) not in names or head is None or id(head) not in names:
        raise UnsupportedArchitecture(f"{type(model).__name__}: no decoder or LM head found")
    prefix = names[id(decoder)]
    qualified = (lambda child: f"{prefix}.{child}") if prefix else (lambda child: child)
    plan = getattr(decoder, "_pp_plan", None) or getattr(model.config, "base_model_pp_plan", None)
    if plan:
        order = list(plan)
        lists = [n for n in order if isinstance(getattr(decoder, n, None), nn.ModuleList)]
        if len(lists) == 1:
            cut = order.index(lists[0])
            return PartModules(
                layers=qualified(lists[0]),
                before=tuple(qualified(n) for n in order[:cut]),
                after=tuple(qualified(n) for n in order[cut + 1 :]),
                head=names[id(head)],
            )
    # No usable plan: the adapter's structural discovery (one ModuleList, embedding, final norm).
    found = ModelAdapter(model, verify=False)
    return PartModules(
        layers=names[id(found.layers)],
        before=(names[id(found.embed)],),
        after=(names[id(found.norm)],),
        head=names[id(head)],
    )


def restrict(model: nn.Module, part: ModelPart, modules: PartModules | None = None) -> nn.Module:
    """Replace, in place, every piece of ``model`` that ``part`` does not hold by a placeholder."""
    modules = modules or locate_parts(model)
    layers = model.get_submodule(modules.layers)
    part.check_fits(len(layers))
    for index in range(len(layers)):
        if index not in part.layers and not isinstance(layers[index], NotHeld):
            layers[index] = ReleasedLayer(index)
    dropped = [*(() if part.embed else modules.before)]
    if not part.head:
        dropped += [*modules.after, modules.head]
    for name in dropped:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, attribute), NotHeld):
            setattr(parent, attribute, NotHeld(_describe(name, modules)))
    return model


def _describe(name: str, modules: PartModules) -> str:
    if name == modules.head:
        return f"the LM head ({name})"
    if name in modules.after:
        return f"the final norm ({name})"
    return f"the input embedding ({name})"
