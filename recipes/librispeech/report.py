"""The results: each row's WER per subset, the table with speaker-level intervals (pooled WER and the paired
relative change against fp32 and the QAT control), and the WER-against-size plot."""
from dataclasses import dataclass, field
from pathlib import Path

from fairseq_quant_runtime.files import atomic_output
from recipes.librispeech.rows import CONTROL_ROW, EVAL_SUBSETS, ROWS, UNSEEN_SYNTH_SUBSET


@dataclass
class ModelResult:
    name: str
    checkpoint: str
    avg_weight_bits: float
    model_mb: float
    wer: dict = field(default_factory=dict)  # subset -> WER %
    words: dict = field(default_factory=dict)  # subset -> reference words
    errors: dict = field(default_factory=dict)  # subset -> S + D + I
    eval_dir: str = ""
    seconds: float = 0.0  # making the model (QAT) and evaluating it


def pooled_wer(result: ModelResult, subsets) -> float:
    words = sum(result.words[s] for s in subsets)
    return 100.0 * sum(result.errors[s] for s in subsets) / words


def table_subsets(subsets) -> list[str]:
    """The subsets pooled into the table's summary column: the test sets of the trained voice families, or all if
    there are none (`test-unseen-synth`, a synthesizer the model never heard, has its own column)."""
    tests = [s for s in subsets if s.startswith("test") and s != UNSEEN_SYNTH_SUBSET]
    return tests or [s for s in subsets if s != UNSEEN_SYNTH_SUBSET] or list(subsets)


def results_table(results: list[ModelResult], subsets=EVAL_SUBSETS) -> str:
    """Markdown: model, bits, MB, WER per subset, pooled WER with its 95% bootstrap interval, and the
    relative change against the first row (fp32, where it is) with its 95% paired bootstrap interval; with `test-unseen-synth`
    among the subsets, also the relative change on it alone (what quantization costs on an unheard synthesizer)."""
    from fairseq_quant.stats import paired_relative_change, read_utterances, speaker_of, wer_interval

    pooled = table_subsets(subsets)
    unseen = UNSEEN_SYNTH_SUBSET in subsets and UNSEEN_SYNTH_SUBSET not in pooled
    utts = {r.name: [read_utterances(Path(r.eval_dir) / f"{s}.utt.tsv") for s in pooled] for r in results}
    unseen_utts = ({r.name: [read_utterances(Path(r.eval_dir) / f"{UNSEEN_SYNTH_SUBSET}.utt.tsv")] for r in results}
                   if unseen else {})
    base = results[0]
    # the QAT schedule with nothing quantized: QAT rows are also compared with it (same training, same data)
    control = next((r for r in results if r.name == CONTROL_ROW), None)
    label = "+".join(pooled)
    head = ("| model | avg weight bits | model MB | " + " | ".join(subsets)
            + f" | WER {label} [95% CI] | rel. change vs {base.name} [95% CI] |"
            + (f" vs {CONTROL_ROW} (same training) [95% CI] |" if control else "")
            + (f" {UNSEEN_SYNTH_SUBSET}: rel. change vs {base.name} [95% CI] |" if unseen else ""))
    lines = [head, "|---|---:|---:|" + "---:|" * len(subsets) + "---:|---:|" + ("---:|" if control else "")
             + ("---:|" if unseen else "")]

    def change(ref, r, groups=utts):
        c = paired_relative_change(groups[ref.name], groups[r.name])
        return c.format(signed=True) + ("" if c.excludes_zero else " (n.s.)")

    for r in results:
        wer = wer_interval(utts[r.name]).format(digits=2)
        rel = "-" if r is base else change(base, r)
        line = (f"| {r.name} | {r.avg_weight_bits:.2f} | {r.model_mb:.3f} | "
                + " | ".join(f"{r.wer[s]:.2f}" for s in subsets) + f" | {wer} | {rel} |")
        if control:
            is_qat = (r.name in ROWS and ROWS[r.name].kind in ("qat", "search_qat", "coqat", "co_search")
                      and r is not control)
            line += f" {change(control, r) if is_qat else '-'} |"
        if unseen:
            line += f" {'-' if r is base else change(base, r, unseen_utts)} |"
        lines.append(line)
    words = ", ".join(f"{s} {base.words[s]}" for s in subsets)
    speakers = ", ".join(f"{s} {len({speaker_of(u.utt_id) for u in g})}" for s, g in
                         zip(pooled + [UNSEEN_SYNTH_SUBSET] * unseen, utts[base.name] + unseen_utts.get(base.name, [])))
    lines += ["", f"Reference words: {words}. Speakers: {speakers}. Intervals: 95%, bootstrap resampling speakers "
                  f"within each subset (cluster bootstrap, 1000 resamples, seed 0, paired for the relative change; "
                  f"n.s. = the interval contains 0)."]
    return "\n".join(lines) + "\n"


# the plot's colour and legend entry of each row kind (recipes/librispeech/rows.py); every kind has one (a test)
KIND_COLORS = {"fp32": "black", "fp32_bundle": "tab:gray", "ptq": "tab:red", "ptq_calibrated": "tab:brown",
               "dynamic_int8": "tab:orange", "qat": "tab:blue", "search_qat": "tab:purple", "runtime": "tab:green",
               "coqat": "tab:cyan", "co_search": "tab:pink"}
KIND_LABELS = {"fp32": "fp32", "fp32_bundle": "size-matched fp32", "ptq": "post-training weights",
               "ptq_calibrated": "calibrated weights + activations", "dynamic_int8": "PyTorch dynamic int8",
               "qat": "QAT", "search_qat": "QAT of a searched allocation", "runtime": "exported, ONNX Runtime",
               "coqat": "co-trained", "co_search": "search over the co-trained model"}
OFF_SCALE = 3.0  # the y axis ends at this multiple of the fp32 row's WER; rows above sit on the edge, WER in their label


def y_top(values: list[float], fp32: float | None) -> float:
    """The plot's upper WER limit: just above the highest row, but at most OFF_SCALE times fp32's WER (a
    post-training 2-bit row at 300% WER would flatten every row that matters)."""
    top = max(values) * 1.05
    return min(top, OFF_SCALE * fp32) if fp32 else top


def _label_offsets(points, labels, ax, fontsize: float, below=None) -> list[tuple[float, float]]:
    """An offset (in points) for each label that does not overlap the labels placed before it, where one of a
    few positions around its point allows (greedy, in display coordinates); points flagged in ``below`` (those on
    the top edge) take positions under them only."""
    scale = ax.figure.dpi / 72.0
    placed = []
    out = []
    for i, ((x, y), text) in enumerate(zip(points, labels)):
        px, py = ax.transData.transform((x, y))
        w, h = 0.6 * fontsize * len(text) * scale, 1.2 * fontsize * scale
        left = -4 - w / scale
        if below is not None and below[i]:
            candidates = [(4, -12), (left, -12), (4, -22), (left, -22), (4, -32), (left, -32), (4, -42), (left, -42)]
        else:
            candidates = [(4, 4), (4, -12), (left, 4), (left, -12), (4, 14), (4, -22), (left, 14), (left, -22)]
        chosen = candidates[0]
        for dx, dy in candidates:
            box = (px + dx * scale, py + dy * scale, px + dx * scale + w, py + dy * scale + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                chosen = (dx, dy)
                break
        dx, dy = chosen
        placed.append((px + dx * scale, py + dy * scale, px + dx * scale + w, py + dy * scale + h))
        out.append(chosen)
    return out


def plot_results(results: list[ModelResult], subsets, path: Path) -> Path:
    """PNG of pooled test WER (with 95% intervals) against model size, one labelled point per row, coloured by
    the row's kind (a legend); rows beyond OFF_SCALE times fp32's WER sit on the top edge with their WER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairseq_quant.stats import read_utterances, wer_interval

    pooled = table_subsets(subsets)
    cis = {r.name: wer_interval([read_utterances(Path(r.eval_dir) / f"{s}.utt.tsv") for s in pooled])
           for r in results}
    fp32 = cis["fp32"].value if "fp32" in cis else None
    top = y_top([cis[r.name].hi for r in results], fp32)
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.set_xscale("log")
    ax.set_ylim(0, top)
    sizes = [r.model_mb for r in results]
    ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.6)
    points, labels, edge, seen = [], [], [], set()
    for r in results:
        kind = ROWS[r.name].kind if r.name in ROWS else "qat"
        ci = cis[r.name]
        color = KIND_COLORS[kind]
        legend = KIND_LABELS[kind] if kind not in seen else None
        seen.add(kind)
        if ci.value > top:  # off the scale: a triangle on the top edge
            ax.plot(r.model_mb, top, marker="^", color=color, linestyle="none", label=legend, clip_on=False)
            points.append((r.model_mb, top))
            labels.append(f"{r.name} ({ci.value:.0f}%)")
            edge.append(True)
            continue
        ax.errorbar(r.model_mb, ci.value, yerr=[[ci.value - ci.lo], [min(ci.hi, top) - ci.value]], fmt="o",
                    color=color, capsize=3, label=legend)
        points.append((r.model_mb, ci.value))
        labels.append(r.name)
        edge.append(False)
    fontsize = 6.5
    # the edge's labels first: they have the fewest places to go
    order = sorted(range(len(points)), key=lambda i: not edge[i])
    offsets = _label_offsets([points[i] for i in order], [labels[i] for i in order], ax, fontsize,
                             [edge[i] for i in order])
    for i, offset in zip(order, offsets):
        (x, y), text = points[i], labels[i]
        ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=fontsize)
    ax.set_xlabel("model size, MB (packed weights + scales; log scale)")
    ax.set_ylabel(f"WER % ({'+'.join(pooled)}), 95% CI")
    ax.set_title("WER against model size" + (f" (axis cut at {OFF_SCALE:g} x fp32's WER)" if fp32 else ""),
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def family_table(eval_dir: Path, voices: dict[str, dict], subsets) -> str:
    """Markdown: WER of one model per evaluation subset and synthesizer voice family (VOICES.json of the corpus),
    with speaker-level 95% intervals, and the best and worst speaker of each: what a subset's WER is made of."""
    from fairseq_quant.stats import read_utterances, speaker_of, wer_interval

    lines = ["| subset | voice family | speakers | words | WER % [95% CI] | best speaker % | worst speaker % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for subset in subsets:
        by_family: dict[str, list] = {}
        for u in read_utterances(Path(eval_dir) / f"{subset}.utt.tsv"):
            family = voices.get(speaker_of(u.utt_id), {}).get("family", "unknown")
            by_family.setdefault(family, []).append(u)
        for family, utts in sorted(by_family.items()):
            per_speaker: dict[str, list] = {}
            for u in utts:
                per_speaker.setdefault(speaker_of(u.utt_id), []).append(u)
            rates = [100.0 * sum(u.errors for u in g) / max(1, sum(u.words for u in g)) for g in per_speaker.values()]
            ci = wer_interval([utts])
            # one speaker: no interval (resampling one cluster gives the value itself)
            wer = ci.format(digits=2) if len(per_speaker) > 1 else f"{ci.value:.2f}%"
            lines.append(f"| {subset} | {family} | {len(per_speaker)} | {sum(u.words for u in utts)} | "
                         f"{wer} | {min(rates):.1f} | {max(rates):.1f} |")
    return "\n".join(lines) + "\n"
