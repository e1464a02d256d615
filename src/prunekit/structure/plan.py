"""The pruning plan: what to keep of a dense model, as plain data.

Every method produces a plan, materialisation consumes it, and a saved checkpoint carries it as its manifest, so
the plan is the one place where "what was cut" is written down. It refers to the ORIGINAL dense model: indices are
those of the dense layer (query heads, KV heads, FFN channels), and there is one entry per dense decoder layer,
removed layers included. That makes a plan reproducible on a fresh copy of the dense model and readable without
knowing which layers were dropped before a given one.

Serialised form: explicit sorted index lists (never ``None`` for "all kept"), so a JSON file alone says exactly
what survives. A removed block stores empty lists; ``layer_removed`` implies both blocks removed.

GQA (``methods/README.md``, "GQA: KV groups"): with g = n_q / n_kv, KV group j is KV head j plus query heads
j*g .. j*g+g-1 (the ``repeat_kv`` order). Every kept query head needs its KV head, and every kept KV group keeps
the same number of query heads, because transformers' attention repeats each KV head a single, per-module number
of times.
"""

from __future__ import annotations

import copy
import json
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter

PLAN_FORMAT = "prunekit-plan"
PLAN_VERSION = 1
# The describe() keys that fix the shapes a plan indexes into; a plan only applies to a model that matches them.
SHAPE_KEYS = ("family", "num_layers", "hidden_size", "head_dim", "num_heads", "num_kv_heads", "intermediate_size")
LAYER_KEYS = ("kept_heads", "kept_kv_heads", "kept_channels", "attn_removed", "mlp_removed", "layer_removed")
BIAS_TARGETS = ("o_proj", "down_proj")


def _index_list(values: Iterable[Any], what: str) -> list[int]:
    """Plain ints (numpy / torch integers accepted), so JSON and equality behave; floats are a caller bug."""
    try:
        return [operator.index(value) for value in values]
    except TypeError as error:
        raise PrunekitError(f"{what} must be a list of integers ({error})") from None


@dataclass
class LayerPlan:
    """What one dense decoder layer keeps. Indices refer to the dense layer and are sorted and unique."""

    kept_heads: list[int] = field(default_factory=list)
    kept_kv_heads: list[int] = field(default_factory=list)
    kept_channels: list[int] = field(default_factory=list)
    attn_removed: bool = False
    mlp_removed: bool = False
    layer_removed: bool = False

    def __post_init__(self) -> None:
        self.normalize()

    def normalize(self) -> None:
        """Make the stored form canonical: a removed layer removes both blocks, a removed block keeps nothing."""
        self.kept_heads = _index_list(self.kept_heads, "kept_heads")
        self.kept_kv_heads = _index_list(self.kept_kv_heads, "kept_kv_heads")
        self.kept_channels = _index_list(self.kept_channels, "kept_channels")
        self.layer_removed = bool(self.layer_removed)
        self.attn_removed = bool(self.attn_removed) or self.layer_removed
        self.mlp_removed = bool(self.mlp_removed) or self.layer_removed
        if self.attn_removed:
            self.kept_heads, self.kept_kv_heads = [], []
        if self.mlp_removed:
            self.kept_channels = []

    @classmethod
    def full(cls, num_heads: int, num_kv_heads: int, intermediate_size: int) -> LayerPlan:
        """A layer that keeps everything."""
        return cls(list(range(num_heads)), list(range(num_kv_heads)), list(range(intermediate_size)))

    @property
    def has_attention(self) -> bool:
        """Attention survives (``layer_removed`` counts as removal even if the flags were edited by hand)."""
        return not (self.attn_removed or self.layer_removed)

    @property
    def has_mlp(self) -> bool:
        return not (self.mlp_removed or self.layer_removed)

    def to_dict(self) -> dict[str, Any]:
        layer = copy.deepcopy(self)
        layer.normalize()
        return {key: getattr(layer, key) for key in LAYER_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "plan layer") -> LayerPlan:
        if not isinstance(data, dict):
            raise PrunekitError(f"{where} must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(LAYER_KEYS))
        missing = [key for key in LAYER_KEYS if key not in data]
        if unknown or missing:
            labelled = (("missing", missing), ("unknown", unknown))
            problems = "; ".join(f"{label} {', '.join(keys)}" for label, keys in labelled if keys)
            raise PrunekitError(f"{where}: {problems}")
        for key in LAYER_KEYS[3:]:
            if not isinstance(data[key], bool):
                raise PrunekitError(f"{where}: {key} must be true or false, got {data[key]!r}")
        for key in LAYER_KEYS[:3]:
            if not isinstance(data[key], list):
                raise PrunekitError(f"{where}: {key} must be a list of integers, got {data[key]!r}")
        return cls(**{key: data[key] for key in LAYER_KEYS})


@dataclass
class PruningPlan:
    """Per-layer keep decisions for one dense model, plus how they were obtained.

    ``dense`` is ``adapter.describe()`` of the dense model the plan applies to; ``settings``, ``seed`` and
    ``calibration`` record how the method ran; ``metrics`` is free (measured ratios, perplexities, timings).
    """

    layers: list[LayerPlan]
    dense: dict[str, Any]
    method: str = "manual"
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # The method changed kept weights (SlimGPT's compensation, FLAP's biases): applying the plan to a fresh dense
    # model would not give the pruned model, so materialisation refuses unless the weights come with it (the
    # method's own edited model, or a checkpoint). None: unknown (a plan written before this field existed).
    weights_edited: bool | None = False
    # Output projections that gain a bias in every surviving block of their kind ("o_proj", "down_proj"), e.g. FLAP's
    # compensation of a model without biases; materialisation creates them (zeros until weights are loaded).
    added_biases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.added_biases) - set(BIAS_TARGETS))
        if unknown:
            raise PrunekitError(f"plan adds a bias to '{unknown[0]}'; only {', '.join(BIAS_TARGETS)} can gain one")
        self.added_biases = sorted(set(self.added_biases))

    # -- constructors --------------------------------------------------------------------------------------
    @classmethod
    def keep_all(cls, adapter: ArchAdapter, method: str = "dense", **meta: Any) -> PruningPlan:
        """The identity plan of ``adapter``'s model; methods start here and cut. ``meta``: settings, seed, ..."""
        layers = [
            LayerPlan.full(adapter.num_heads, adapter.num_kv_heads, adapter.intermediate_size)
            for _ in range(adapter.num_layers)
        ]
        return cls(layers=layers, dense=adapter.describe(), method=method, **meta)

    @classmethod
    def from_block_removals(
        cls,
        adapter: ArchAdapter,
        attention: Iterable[int] = (),
        mlp: Iterable[int] = (),
        layers: Iterable[int] = (),
        method: str = "manual",
        **meta: Any,
    ) -> PruningPlan:
        """A depth-only plan (BlockPruner, ShortGPT, SLEB): the given sub-blocks / whole layers removed."""
        plan = cls.keep_all(adapter, method=method, **meta)
        for index in attention:
            plan.remove_attention(index)
        for index in mlp:
            plan.remove_mlp(index)
        for index in layers:
            plan.remove_layer(index)
        return plan

    # -- builders (edit one layer in place) ------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        """g of the dense model: query heads per KV head."""
        if "num_heads" not in self.dense or "num_kv_heads" not in self.dense:
            raise PrunekitError("plan's dense description lacks the head counts; build it with PruningPlan.keep_all")
        return self.dense["num_heads"] // self.dense["num_kv_heads"]

    def _layer(self, index: int) -> LayerPlan:
        if not 0 <= index < len(self.layers):
            raise PrunekitError(f"plan has no layer {index} (it has {len(self.layers)})")
        return self.layers[index]

    def remove_attention(self, index: int) -> None:
        layer = self._layer(index)
        layer.attn_removed = True
        layer.normalize()

    def remove_mlp(self, index: int) -> None:
        layer = self._layer(index)
        layer.mlp_removed = True
        layer.normalize()

    def remove_layer(self, index: int) -> None:
        layer = self._layer(index)
        layer.layer_removed = True
        layer.normalize()

    def keep_heads(self, index: int, heads: Iterable[int]) -> None:
        """Keep these query heads (and exactly the KV heads they need); none at all removes the attention."""
        layer = self._layer(index)
        if not layer.has_attention:
            raise PrunekitError(f"plan layer {index}: attention is removed, so it cannot keep heads")
        kept = sorted(set(_index_list(heads, "heads")))
        if not kept:
            self.remove_attention(index)
            return
        layer.kept_heads = kept
        layer.kept_kv_heads = sorted({head // self.heads_per_group for head in kept})

    def keep_kv_groups(self, index: int, groups: Iterable[int]) -> None:
        """Keep whole KV groups (KV head j with all its g query heads); none at all removes the attention."""
        g = self.heads_per_group
        kept = sorted(set(_index_list(groups, "groups")))
        self.keep_heads(index, [head for group in kept for head in range(group * g, group * g + g)])

    def keep_channels(self, index: int, channels: Iterable[int]) -> None:
        """Keep these FFN channels; none at all removes the MLP."""
        layer = self._layer(index)
        if not layer.has_mlp:
            raise PrunekitError(f"plan layer {index}: the MLP is removed, so it cannot keep channels")
        kept = sorted(set(_index_list(channels, "channels")))
        if not kept:
            self.remove_mlp(index)
            return
        layer.kept_channels = kept

    # -- views ---------------------------------------------------------------------------------------------
    def surviving_layers(self) -> list[int]:
        """Dense indices of the layers that stay in the model, in order."""
        return [index for index, layer in enumerate(self.layers) if not layer.layer_removed]

    def layer_shapes(self) -> list[dict[str, Any]]:
        """Per surviving layer: its dense index and the shapes a loader must build (what config.json records)."""
        layer_types = self.dense.get("layer_types")
        shapes = []
        for index in self.surviving_layers():
            layer = self.layers[index]
            shapes.append({
                "source_layer": index,
                "layer_type": layer_types[index] if layer_types else None,
                "attention": layer.has_attention,
                "mlp": layer.has_mlp,
                "num_heads": len(layer.kept_heads) if layer.has_attention else 0,
                "num_kv_heads": len(layer.kept_kv_heads) if layer.has_attention else 0,
                "intermediate_size": len(layer.kept_channels) if layer.has_mlp else 0,
            })
        return shapes

    def copy(self) -> PruningPlan:
        return copy.deepcopy(self)

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self, adapter: ArchAdapter) -> None:
        """Raise PrunekitError (one line, naming the layer) unless the plan can be materialised on this model."""
        _check_same_dense(self.dense, adapter.describe())
        if len(self.layers) != adapter.num_layers:
            raise PrunekitError(f"plan has {len(self.layers)} layers but the model has {adapter.num_layers}")
        for index, layer in enumerate(self.layers):
            try:  # a canonical copy: hand-edited flags and numpy / torch integers are read as the plan means them
                checked = LayerPlan(**{key: getattr(layer, key) for key in LAYER_KEYS})
            except PrunekitError as error:
                raise PrunekitError(f"plan layer {index}: {error}") from None
            problem = _attention_problem(checked, adapter) or _mlp_problem(checked, adapter)
            if problem:
                raise PrunekitError(f"plan layer {index}: {problem}")
        if not any(layer.has_attention or layer.has_mlp for layer in self.layers):
            raise PrunekitError("plan removes every block of every layer, which leaves no model; keep at least one")

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "seed": self.seed,
            "settings": copy.deepcopy(self.settings),
            "calibration": copy.deepcopy(self.calibration),
            "metrics": copy.deepcopy(self.metrics),
            "weights_edited": self.weights_edited,
            "added_biases": list(self.added_biases),
            "dense": copy.deepcopy(self.dense),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PrunekitError(f"not a prunekit plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            version = data.get("version")
            raise PrunekitError(f"plan format version {version!r} is not supported (expected {PLAN_VERSION})")
        for key, kind in (("layers", list), ("dense", dict)):
            if not isinstance(data.get(key), kind):
                raise PrunekitError(f"plan field '{key}' is missing or not a JSON {kind.__name__}")
        layers = [LayerPlan.from_dict(layer, f"plan layer {i}") for i, layer in enumerate(data["layers"])]
        return cls(
            layers=layers,
            dense=copy.deepcopy(data["dense"]),
            method=str(data.get("method", "manual")),
            settings=copy.deepcopy(data.get("settings") or {}),
            seed=data.get("seed"),
            calibration=copy.deepcopy(data.get("calibration") or {}),
            metrics=copy.deepcopy(data.get("metrics") or {}),
            weights_edited=_optional_bool(data.get("weights_edited")),
            added_biases=_string_list(data.get("added_biases") or [], "added_biases"),
        )

    def to_json(self) -> str:
        """Readable JSON: header fields indented, one line per layer (long index lists stay on their line)."""
        data = self.to_dict()
        layers = data.pop("layers")
        try:
            head = json.dumps(data, indent=2)
        except TypeError as error:
            raise PrunekitError(f"plan metadata is not JSON-serialisable: {error}") from None
        rows = ",\n    ".join(json.dumps(layer, separators=(", ", ": ")) for layer in layers)
        return head[:-2] + ',\n  "layers": [\n    ' + rows + "\n  ]\n}\n"

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PrunekitError(f"plan is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _optional_bool(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise PrunekitError(f"plan field 'weights_edited' must be true, false or null, got {value!r}")
    return value


def _string_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PrunekitError(f"plan field '{name}' must be a list of names, got {value!r}")
    return value


def _check_same_dense(planned: dict[str, Any], actual: dict[str, Any]) -> None:
    for key in SHAPE_KEYS:
        if key not in planned:
            raise PrunekitError(f"plan's dense description lacks '{key}'; build plans with PruningPlan.keep_all")
        if planned[key] != actual[key]:
            raise PrunekitError(
                f"plan was made for a different model: {key} is {planned[key]!r} in the plan "
                f"but {actual[key]!r} in the model"
            )


def _index_problem(name: str, values: list[int], bound: int) -> str | None:
    outside = [value for value in values if not 0 <= value < bound]
    if outside:
        return f"{name} has index {outside[0]} outside 0..{bound - 1}"
    if any(later <= earlier for earlier, later in zip(values, values[1:], strict=False)):
        return f"{name} must be sorted and without duplicates"
    return None


def _attention_problem(layer: LayerPlan, adapter: ArchAdapter) -> str | None:
    if not layer.has_attention:
        return None  # a removed block's index lists are ignored (and stored empty)
    heads, kv_heads, g = layer.kept_heads, layer.kept_kv_heads, adapter.heads_per_group
    problem = _index_problem("kept_heads", heads, adapter.num_heads) or _index_problem(
        "kept_kv_heads", kv_heads, adapter.num_kv_heads
    )
    if problem:
        return problem
    if not kv_heads or not heads:
        return "attention keeps no KV head or no query head; mark the attention block removed instead"
    kept_kv = set(kv_heads)
    orphan = next((head for head in heads if head // g not in kept_kv), None)
    if orphan is not None:
        return f"query head {orphan} needs KV head {orphan // g}, which is not kept"
    per_group = Counter(head // g for head in heads)
    empty = next((kv for kv in kv_heads if not per_group[kv]), None)
    if empty is not None:
        return f"KV head {empty} is kept but none of its query heads {empty * g}..{empty * g + g - 1}"
    if len(set(per_group.values())) > 1:
        sizes = ", ".join(f"KV head {kv}: {per_group[kv]}" for kv in kv_heads)
        return f"kept KV groups keep different numbers of query heads ({sizes}); transformers needs one group size"
    return None


def _mlp_problem(layer: LayerPlan, adapter: ArchAdapter) -> str | None:
    if not layer.has_mlp:
        return None
    problem = _index_problem("kept_channels", layer.kept_channels, adapter.intermediate_size)
    if problem:
        return problem
    if not layer.kept_channels:
        return "MLP keeps no channel; mark the MLP block removed instead"
    return None
