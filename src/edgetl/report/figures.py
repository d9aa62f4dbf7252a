"""The report's pictures: matplotlib (Agg, no display) to PNG, and small Pillow thumbnails.

One style for every figure: the Okabe-Ito palette (distinguishable with every common colour
vision deficiency), a single-hue ramp for counts, a perceptually uniform one (inferno) for
defect heat maps, and meaning never carried by colour alone (labels, hatches, line styles).
Each function returns an :class:`Image`: PNG bytes and the size it is shown at.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, require

# Okabe & Ito (2008), "Color Universal Design".
BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, YELLOW, BLACK = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#56B4E9",
    "#CC79A7",
    "#F0E442",
    "#000000",
)
INK, MUTED, GRID = "#1b1f24", "#5b6470", "#e3e7ec"
# Rendered at twice the size shown: sharp on high-density screens and in a printed PDF.
DPI = 200
SHOWN_DPI = 100


@dataclass
class Image:
    png: bytes
    width: int  # CSS pixels
    height: int
    alt: str

    @property
    def uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


_plt = None


def pyplot():
    """matplotlib's pyplot on the Agg backend with the report's style (imported once, lazily).

    Raises:
        MissingDependency: matplotlib is not installed (``pip install 'edgetl[report]'``).
    """
    global _plt
    if _plt is None:
        mpl = require("matplotlib", extra="report", purpose="edgetl report (its figures)")
        mpl.use("Agg", force=True)
        import matplotlib.pyplot as plt

        plt.rcParams.update(
            {
                "font.family": "DejaVu Sans",
                "font.size": 8.5,
                "axes.titlesize": 9.5,
                "axes.titleweight": "bold",
                "axes.titlelocation": "left",
                "axes.labelcolor": INK,
                "axes.edgecolor": MUTED,
                "axes.linewidth": 0.8,
                "axes.spines.top": False,
                "axes.spines.right": False,
                "axes.grid": True,
                "grid.color": GRID,
                "grid.linewidth": 0.7,
                "axes.axisbelow": True,
                "xtick.color": MUTED,
                "ytick.color": MUTED,
                "legend.frameon": False,
                "legend.fontsize": 8,
                "figure.facecolor": "white",
                "savefig.facecolor": "white",
                "axes.prop_cycle": mpl.cycler(color=[BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE, BLACK]),
                "svg.fonttype": "none",
                "path.simplify": True,
            }
        )
        _plt = plt
    return _plt


def _save(fig, alt: str) -> Image:
    plt = pyplot()
    buf = io.BytesIO()
    w, h = fig.get_size_inches()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches=None)
    plt.close(fig)
    return Image(buf.getvalue(), int(round(w * SHOWN_DPI)), int(round(h * SHOWN_DPI)), alt)


def _pct_axis(ax, which: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    # decimals=None: as many as the axis range needs (92.5 %, 93 % ... on a narrow one, never 94 % twice).
    (ax.yaxis if which == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=None))


def _short(label: str, n: int = 14) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


# ------------------------------------------------------------------------------ summary
def gate_interval(gate: dict) -> Image | None:
    """The conversion gate as a picture: the drop vs FP32, its one-sided bounds, the tolerance."""
    if not gate or gate.get("drop_pp") is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 1.35))
    lo, hi, d, tol = gate["lower_pp"], gate["upper_pp"], gate["drop_pp"], gate["tolerance_pp"]
    colour = {"passed": BLUE, "refused": VERMILLION}.get(gate.get("verdict"), ORANGE)
    ax.axvspan(tol, max(hi, tol) + abs(hi - lo) + 1, color=VERMILLION, alpha=0.08, lw=0)
    ax.axvline(tol, color=VERMILLION, ls="--", lw=1.2)
    ax.text(
        tol,
        1.02,
        f" tolerance {tol:g} pp",
        color=VERMILLION,
        fontsize=8,
        va="bottom",
        transform=ax.get_xaxis_transform(),
    )
    ax.axvline(0, color=MUTED, lw=0.8)
    ax.plot([lo, hi], [0.5, 0.5], color=colour, lw=3, solid_capstyle="butt")
    ax.plot([d], [0.5], "o", color=colour, ms=7, mec="white", mew=1.2)
    ax.text(d, 0.72, f"{d:+.2f} pp", ha="center", fontsize=8.5, color=INK)
    ax.set_yticks([])
    ax.grid(axis="y", visible=False)
    ax.spines["left"].set_visible(False)
    ax.set_ylim(0, 1)
    span = max(abs(lo), abs(hi), abs(tol)) * 1.25 + 0.5
    ax.set_xlim(-span, span)
    metric = gate.get("metric", "accuracy").replace("_", " ")
    ax.set_xlabel(f"{metric} drop vs FP32 (percentage points; bar: {gate.get('confidence', 0.95):.0%} bounds)")
    fig.subplots_adjust(left=0.03, right=0.97, top=0.78, bottom=0.38)
    return _save(fig, f"gate: {metric} drop {d:+.2f} pp, bounds [{lo:.2f}, {hi:.2f}], tolerance {tol:g} pp")


# ------------------------------------------------------------------------ classification
def confusion(m: dict) -> Image:
    """Confusion matrix: colour is the share of the true class (rows), numbers are counts."""
    plt = pyplot()
    labels = m["labels"]
    cm = np.asarray(m["confusion_matrix"], np.float64)
    k = len(labels)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(7.2, max(3.2, 0.36 * k + 1.5))
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.grid(False)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8 if k <= 15 else 6,
                        color="white" if share[i, j] > 0.55 else INK,
                    )
    names = [_short(l) for l in labels]
    ax.set_xticks(
        range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=8 if k <= 20 else 6
    )
    ax.set_yticks(range(k), names, fontsize=8 if k <= 20 else 6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for s in ax.spines.values():
        s.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    _pct_axis(cb.ax)
    cb.outline.set_visible(False)
    cb.set_label("share of the true class", fontsize=7.5, color=MUTED)
    ax.set_title("confusion matrix")
    fig.tight_layout()
    return _save(fig, "confusion matrix")


def per_class(m: dict, *, fp32: dict | None = None, fit_recall: dict | None = None) -> Image:
    """Recall and precision per class (and FP32 / at-fit recall where known), horizontal bars."""
    plt = pyplot()
    labels = m["labels"]
    k = len(labels)
    series = [("recall", m["per_class_recall"], BLUE, None), ("precision", m["per_class_precision"], ORANGE, "///")]
    if fp32:
        series.append(("FP32 recall", fp32, MUTED, "..."))
    if fit_recall:
        series.append(("recall at fit (validation)", fit_recall, SKY, "\\\\"))
    h = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(4.6, min(9.0, max(2.2, 0.14 * k * len(series) + 0.25 * k + 0.8))))
    ys = np.arange(k)
    for si, (name, vals, colour, hatch) in enumerate(series):
        v = [np.nan if vals.get(l) is None else vals[l] for l in labels]
        ax.barh(
            ys + (si - (len(series) - 1) / 2) * h,
            v,
            height=h,
            color=colour,
            label=name,
            hatch=hatch,
            edgecolor="white",
            lw=0.4,
        )
    ax.set_yticks(ys, [_short(l, 18) for l in labels], fontsize=8 if k <= 20 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    _pct_axis(ax, "x")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(series), fontsize=7.5, handlelength=1.2)
    fig.tight_layout()
    return _save(fig, "recall and precision per class")


def fp32_vs_converted(reference: dict, precision: str) -> Image | None:
    """FP32 against the shipped model on the validation items (from the fit's record)."""
    fp32, conv = reference.get("fp32_val_accuracy"), reference.get("val_accuracy")
    if fp32 is None or conv is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.4, 1.5))
    ax.barh([0, 1], [fp32, conv], color=[MUTED, BLUE], height=0.6)
    for y, v in ((0, fp32), (1, conv)):
        ax.text(v, y, f" {v:.2%}", va="center", fontsize=8)
    ax.set_yticks([0, 1], ["FP32", precision.upper()])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    _pct_axis(ax, "x")
    ax.grid(axis="y", visible=False)
    ax.set_title("validation accuracy")
    fig.tight_layout()
    return _save(fig, f"validation accuracy: FP32 {fp32:.2%}, converted {conv:.2%}")


def reliability(cal: dict) -> Image:
    """Reliability diagram: accuracy against confidence per bin, with the counts underneath."""
    plt = pyplot()
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.2, 4.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = cal["bins"]
    mid = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = [np.nan if b["accuracy"] is None else b["accuracy"] for b in bins]
    ax.plot([0, 1], [0, 1], color=MUTED, ls="--", lw=1, label="perfectly calibrated")
    ax.bar(mid, acc, width=width * 0.92, color=BLUE, alpha=0.85, label="accuracy in bin")
    conf = [b["confidence"] for b in bins if b["confidence"] is not None]
    accs = [b["accuracy"] for b in bins if b["confidence"] is not None]
    ax.plot(conf, accs, "o", color=ORANGE, ms=4, label="mean confidence in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    _pct_axis(ax)
    ax.legend(loc="upper left", fontsize=7.5, frameon=True, facecolor="white", edgecolor=GRID, framealpha=0.92)
    ax.set_title(f"reliability (calibration error {cal['ece']:.3f})")
    axn.bar(mid, [b["n"] for b in bins], width=width * 0.92, color=SKY)
    axn.set_ylabel("items")
    axn.set_xlabel("confidence of the answer")
    _pct_axis(axn, "x")
    fig.tight_layout()
    return _save(fig, f"reliability diagram, ECE {cal['ece']:.3f}")


def coverage(curve: list[dict], current: dict | None, marks: list[dict] = ()) -> Image:
    """Accuracy on the answered items against coverage as the "unknown" threshold rises; ``marks``
    (eval's ``coverage`` rows) are labelled with their thresholds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.3))
    cov = np.array([c["coverage"] for c in curve])
    acc = np.array([np.nan if c["accuracy"] is None else c["accuracy"] for c in curve])
    ax.plot(cov, acc, color=BLUE, lw=1.8)
    for i, c in enumerate(marks):
        if c["accuracy"] is not None and 0 < c["coverage"] < 1:
            ax.plot(c["coverage"], c["accuracy"], "o", color=BLUE, ms=3.5)
            ax.annotate(
                f"{c['threshold']:.2f}",
                (c["coverage"], c["accuracy"]),
                textcoords="offset points",
                xytext=(3, -11 if i % 2 else 5),
                fontsize=7,
                color=MUTED,
            )
    if current and current.get("accuracy") is not None:
        ax.plot(
            current["coverage"],
            current["accuracy"],
            "D",
            color=VERMILLION,
            ms=6,
            mec="white",
            label=f"this bundle's threshold ({current['threshold']:.2f})",
        )
        ax.legend(loc="lower left", fontsize=7.5)
    ax.set_xlim(1.02, 0)  # left to right: more and more answers held back
    lo = np.nanmin(acc) if np.isfinite(acc).any() else 0
    ax.set_ylim(max(0, lo - 0.05), 1.01)
    ax.set_xlabel("coverage (share answered; the rest 'unknown')")
    ax.set_ylabel("accuracy on the answered")
    _pct_axis(ax)
    _pct_axis(ax, "x")
    ax.set_title("accuracy vs coverage (numbers: threshold)")
    fig.tight_layout()
    return _save(fig, "accuracy against coverage as the unknown threshold varies")


# ------------------------------------------------------------------------------ defects
def score_histograms(scores: list[dict]) -> Image:
    """Normalised defect scores of good and defective images, with the threshold (1.0)."""
    plt = pyplot()
    s = np.array([r["normalised"] for r in scores])
    bad = np.array([r["label"] != "good" for r in scores])
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    top = max(2.0, float(np.quantile(s, 0.99)) * 1.05 if len(s) else 2.0)
    bins = np.linspace(0, top, 40)
    clipped = np.minimum(s, top)
    ax.hist(clipped[~bad], bins=bins, color=BLUE, alpha=0.75, label=f"good ({int((~bad).sum())})")
    if bad.any():
        ax.hist(
            clipped[bad],
            bins=bins,
            color=ORANGE,
            alpha=0.75,
            hatch="///",
            edgecolor="white",
            lw=0,
            label=f"defect ({int(bad.sum())})",
        )
    ax.axvline(1.0, color=VERMILLION, ls="--", lw=1.4, label="threshold (1.0)")
    ax.set_xlabel("defect score / threshold (scores past the right edge are drawn at it)")
    ax.set_ylabel("images")
    ax.legend(loc="upper right")
    ax.set_title("scores of good and defective images")
    fig.tight_layout()
    return _save(fig, "histograms of defect scores for good and defective images")


def roc(curves: list[tuple[str, dict, float | None, str]]) -> Image:
    """ROC curves: (name, curve, AUROC, colour); the image-level operating point is marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], color=MUTED, ls=":", lw=1)
    styles = ["-", "--"]
    for i, (name, c, auc, colour) in enumerate(curves):
        label = f"{name} (AUROC {auc:.3f})" if auc is not None else name
        ax.plot(c["fpr"], c["tpr"], color=colour, lw=1.8, ls=styles[i % 2], label=label)
        if i == 0 and c.get("at_threshold"):
            a = c["at_threshold"]
            ax.plot(a["fpr"], a["tpr"], "D", color=VERMILLION, ms=6, mec="white", label="at the threshold")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=7.5)
    ax.set_title("ROC")
    fig.tight_layout()
    return _save(fig, "ROC curves")


def per_defect(aurocs: dict) -> Image | None:
    items = [(k, v) for k, v in aurocs.items() if v is not None]
    if not items:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.6, max(1.6, 0.3 * len(items) + 0.8)))
    ax.barh(range(len(items)), [v for _, v in items], color=ORANGE, height=0.6)
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=7.5)
    ax.set_yticks(range(len(items)), [_short(k, 18) for k, _ in items])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)
    ax.grid(axis="y", visible=False)
    ax.set_title("image AUROC per defect type")
    fig.tight_layout()
    return _save(fig, "image AUROC per defect type")


# ------------------------------------------------------------------------------ history
def history(rows: list[dict], *, percent: bool) -> Image | None:
    """The recorded figure (and the figure on the data, where measured) per head version."""
    xs = [r["version"] for r in rows]
    if len(xs) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 2.5))
    rec = [np.nan if r["figure"] is None else r["figure"] for r in rows]
    if np.isfinite(rec).any():
        ax.plot(xs, rec, "o-", color=BLUE, lw=1.6, label="recorded when made")
    data = [
        np.nan if not r.get("on_data") or r["on_data"].get("value") is None else r["on_data"]["value"] for r in rows
    ]
    if np.isfinite(data).any():
        ax.plot(xs, data, "s--", color=ORANGE, lw=1.6, label="on the report's data")
    for r in rows:
        if r["status"] == "current":
            ax.axvline(r["version"], color=GREEN, lw=6, alpha=0.18)
        if r["status"] == "rolled back":
            ax.text(
                r["version"],
                1.0,
                "rolled back",
                ha="center",
                va="bottom",
                fontsize=7,
                color=VERMILLION,
                transform=ax.get_xaxis_transform(),
            )
    ax.set_xticks(xs, [f"v{x}" for x in xs])
    if percent:
        _pct_axis(ax)
    ax.legend(loc="best", fontsize=7.5, frameon=True, facecolor="white", edgecolor=GRID, framealpha=0.92)
    ax.set_title("head versions (shaded: current)", pad=12)
    fig.tight_layout()
    return _save(fig, "figures per head version")


def memory_history(rows: list[dict]) -> Image | None:
    xs = [r["version"] for r in rows]
    if len(xs) < 2 or all(r.get("memory_images") is None for r in rows):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 2.3))
    ax.bar(xs, [r.get("memory_images") or 0 for r in rows], color=SKY, width=0.6, label="good images learned")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.get("threshold") or np.nan for r in rows], "o-", color=VERMILLION, label="threshold")
    ax2.grid(False)
    ax2.spines["right"].set_visible(True)
    ax.set_xticks(xs, [f"v{x}" for x in xs])
    ax.set_ylabel("good images learned")
    ax2.set_ylabel("threshold (raw score)")
    for r in rows:
        if r["status"] == "current":
            ax.axvline(r["version"], color=GREEN, lw=6, alpha=0.18)
    ax.set_title("memory and threshold per head version (shaded: current)")
    fig.tight_layout()
    return _save(fig, "memory and threshold per head version")


# -------------------------------------------------------------------------------- speed
def latency(speed: dict) -> Image:
    """Batch-1 latency distribution, and throughput per batch size, as timed here."""
    plt = pyplot()
    per = speed.get("per_batch") or []
    fig, axes = plt.subplots(1, 2 if len(per) > 1 else 1, figsize=(7.4 if len(per) > 1 else 4.2, 2.8), squeeze=False)
    ax = axes[0][0]
    s = np.array(speed["samples_ms"])
    ax.hist(s, bins=min(30, max(8, len(s) // 3)), color=BLUE, alpha=0.85)
    p50, p90 = speed["latency_ms"]["p50"], speed["latency_ms"]["p90"]
    ax.axvline(p50, color=BLACK, lw=1.2, label=f"p50 {p50:.2f} ms")
    ax.axvline(p90, color=BLACK, lw=1.2, ls="--", label=f"p90 {p90:.2f} ms")
    budget = speed.get("latency_budget_ms")
    if budget and budget <= 3 * s.max():
        ax.axvline(budget, color=VERMILLION, lw=1.4, ls=":", label=f"budget {budget:g} ms")
    elif budget:  # far to the right: drawing it would squeeze the distribution into one bar
        ax.plot([], [], " ", label=f"budget {budget:g} ms (off the scale)")
    ax.set_xlabel("ms per call (batch 1)")
    ax.set_ylabel("runs")
    ax.legend(fontsize=7.5)
    ax.set_title(f"batch-1 latency ({len(s)} runs)")
    if len(per) > 1:
        ax = axes[0][1]
        ax.bar([str(p["batch"]) for p in per], [p["items_per_s"] for p in per], color=GREEN)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{speed.get('items', 'items')} per second")
        ax.grid(axis="x", visible=False)
        ax.set_title("throughput")
    fig.tight_layout()
    return _save(fig, "latency distribution and throughput per batch size")


# ------------------------------------------------------------------------ thumbnails
def thumbnail(path: str, *, size: int = 112) -> str | None:
    """A small JPEG data URI of an image file (None when it cannot be read any more)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    from ..core.preprocess import load_rgb

    try:  # the model's own decoder: pixel budget, EXIF orientation, 16-bit and CMYK handled alike
        im = ImageOps.fit(load_rgb(path, need=size), (size, size), PILImage.Resampling.BILINEAR)
    except DataError:
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(
    image: np.ndarray, norm_map: np.ndarray | None, mask: np.ndarray | None, *, vmax: float = 1.5, size: int = 160
) -> str:
    """An image as the model saw it with its heat map on top (inferno; opacity grows with the
    score, so good areas stay readable) and the true defect's outline (white) where a mask
    exists; a JPEG data URI."""
    from PIL import Image as PILImage

    from ..core.heatmap import blend

    out = image.astype(np.float32)
    if norm_map is not None:  # None: a head without a heat map, the image alone
        out = blend(out, norm_map, vmax=vmax)
    if mask is not None and mask.any():
        m = mask.astype(bool)
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        edge = m & ~inner
        thick = edge.copy()
        thick[1:, :] |= edge[:-1, :]
        thick[:, 1:] |= edge[:, :-1]
        out[thick] = (255, 255, 255)
    im = PILImage.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    if im.width > size:
        im = im.resize((size, size), PILImage.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
