"""Building a DeepSpeed ``PipelineModule`` for a model builder (``envpipe.models``): the one place that knows
how DeepSpeed partitions layers.

DeepSpeed's public partition methods (``uniform``, ``parameters``, ``type:...``) cannot express "these
boundaries"; :func:`pipeline_module` takes a ``bounds`` function and applies it by overriding
``PipelineModule._partition_layers`` (private: ``_topo``, ``_layer_specs``, ``_set_bounds``), and
:func:`local_layers` reads ``_local_start`` / ``_local_stop``. Those names live here only, next to the
DeepSpeed version they were read from (0.15+, unchanged through 0.18).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Bounds = Callable[[int, int], list[int]]
"""(number of layer specs, number of stages) -> stage boundaries ``parts`` (len = stages + 1)."""


def layer_spec(layer_class: Any, *args: Any, **kwargs: Any) -> Any:
    """A DeepSpeed ``LayerSpec``: the layer is built only on the stage that holds it."""
    from deepspeed.pipe import LayerSpec

    return LayerSpec(layer_class, *args, **kwargs)


def tied_layer_spec(key: str, layer_class: Any, *args: Any, **kwargs: Any) -> Any:
    """A DeepSpeed ``TiedLayerSpec``: layers with one ``key`` share ``tied_weight_attr`` across stages."""
    from deepspeed.pipe import TiedLayerSpec

    return TiedLayerSpec(key, layer_class, *args, **kwargs)


def pipeline_module(
    layers: Sequence[Any],
    *,
    bounds: Bounds,
    num_stages: int | None,
    topology: Any,
    loss_fn: Callable[..., Any],
    seed: int,
    activation_checkpoint_interval: int,
    checkpointable_layers: Sequence[str],
) -> Any:
    """This rank's ``PipelineModule`` with stage boundaries from ``bounds``.

    Layers are seeded from their index (the same weights whatever the split); DeepSpeed's reseeding of every
    layer in every forward is then turned off (a model without dropout does not need it, and it costs ~20%
    of a CPU step: torch's lazy CUDA seeding formats a stack trace each time).
    """
    module = _bounded_class()(
        bounds,
        layers=list(layers),
        num_stages=num_stages,
        topology=topology,
        loss_fn=loss_fn,
        seed_layers=True,
        base_seed=seed,
        partition_method="uniform",
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=list(checkpointable_layers),
    )
    module.seed_layers = False
    return module


def local_layers(module: Any) -> range:
    """The global indices of the layers this rank's ``PipelineModule`` holds (its stage's part)."""
    return range(module._local_start, module._local_stop)


def _bounded_class() -> type:
    from deepspeed.pipe import PipelineModule

    class BoundedPipelineModule(PipelineModule):
        """A PipelineModule whose stage boundaries come from a function of (layer count, stage count)."""

        def __init__(self, bounds: Bounds, **kwargs: Any) -> None:
            object.__setattr__(self, "_envpipe_bounds", bounds)  # read during PipelineModule.__init__
            super().__init__(**kwargs)

        def _partition_layers(self, method: str = "uniform") -> None:
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = self._envpipe_bounds(len(self._layer_specs), self.num_stages)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return BoundedPipelineModule
