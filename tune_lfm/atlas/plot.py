"""One figure per atlas: a panel per method plus the combined score, bars coloured by layer type, hubs outlined,
and the tuned model's scores as markers when an adapter was measured."""

from __future__ import annotations

from pathlib import Path

from .ranking import quota_forced
from .scores import METHODS
from .store import Atlas

PANELS = {"influence": "block influence\n1 - cos(in, out)", "ablation": "ablation\nloss rise (nats)",
          "combined": "combined\nmean rank (0-1)"}


def plot_atlas(atlas: Atlas, path: str | Path, tuned: dict[str, list[float]] | None = None,
               tuned_combined: list[float] | None = None) -> Path:
    """Write the atlas figure to `path` (format from its suffix) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    base = {**atlas.scores, "combined": atlas.combined}
    after = {**tuned, "combined": tuned_combined} if tuned is not None else None
    kinds = sorted(set(atlas.layer_types))
    colours = {kind: plt.get_cmap("tab10")(i) for i, kind in enumerate(kinds)}
    layers = range(len(atlas.layer_types))
    forced = quota_forced(atlas.combined, atlas.hubs, atlas.k)
    figure, axes = plt.subplots(len(METHODS) + 1, 1, sharex=True, figsize=(max(6, 0.5 * len(layers) + 3), 7.5))
    tuned_marker = None
    for ax, name in zip(axes, [*METHODS, "combined"]):
        ax.bar(layers, base[name], color=[colours[t] for t in atlas.layer_types],
               edgecolor=["black" if i in atlas.hubs else "none" for i in layers],
               linewidth=[2.5 if i in atlas.hubs else 0 for i in layers])
        if forced:
            ax.bar(forced, [base[name][i] for i in forced], fill=False, hatch="//", linewidth=0)
        if after is not None:
            (tuned_marker,) = ax.plot(layers, after[name], "D", color="black", markersize=5, label="tuned")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylabel(PANELS[name], fontsize=8)
    handles = [Patch(color=colours[kind], label=kind) for kind in kinds]
    quota = ", ".join(f"{kind} {n}" for kind, n in atlas.quota.items())
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.5,
                         label=f"hub ({atlas.k} layers" + (f"; quota {quota})" if quota else ")")))
    if forced:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.5, hatch="//",
                             label=f"hub forced by the quota (not in the top {atlas.k} by score)"))
    if tuned_marker is not None:
        handles.append(tuned_marker)
    axes[0].legend(handles=handles, fontsize=7, loc="upper right")
    axes[-1].set_xlabel("decoder layer")
    axes[-1].set_xticks(list(layers))
    figure.suptitle(f"hub atlas of {atlas.model}: hubs {atlas.hubs}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
