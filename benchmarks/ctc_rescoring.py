#!/usr/bin/env python
"""What the CTC head buys at decoding time, side by side on the same utterances: attention-only beam search,
the same beam's n-best rescored with the CTC log-likelihood, joint CTC/attention beam search (the product's
default decoding: CTC prefix scores during the search), the n-best oracle and CTC greedy decoding.

The CTC head is the model's own (an ``*_ctc`` arch, e.g. the shipped reference bundle); for an older training
checkpoint whose head lived in the criterion state, that head is used. Rescored score = (1 - w) * attention
log-probability (summed over the hypothesis) + w * CTC log-likelihood (without EOS); joint decoding scores the
same sum during the search (fairseq_quant.evaluate.JointCTCModel), for each weight w of --ctc-weights.

    python benchmarks/ctc_rescoring.py --checkpoint recipes/librispeech/reference/model.pt \
        --data exp/default/data --subsets dev-clean,dev-other,test-clean,test-other --ctc-weights 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jiwer
import sentencepiece as spm
import torch
import torch.nn.functional as F
from fairseq.sequence_generator import SequenceGenerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fairseq_quant  # noqa: E402,F401  (registers the models and criteria)
from fairseq_quant.evaluate import (decode_subset, find_spm_model, has_ctc_head, load_checkpoint,  # noqa: E402
                                   word_error_rate)


def ctc_projection(checkpoint: Path, model) -> tuple[torch.Tensor, torch.Tensor]:
    if has_ctc_head(model):
        return model.ctc_proj.weight.detach(), model.ctc_proj.bias.detach()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    criterion = state.get("criterion") or {}
    if "ctc_proj.weight" not in criterion:
        raise SystemExit(f"{checkpoint}: neither the model (an *_ctc arch) nor the criterion state has a CTC head")
    return criterion["ctc_proj.weight"], criterion["ctc_proj.bias"]


def collapse(ids: list[int], blank: int) -> list[int]:
    out, prev = [], None
    for t in ids:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def decode(model, task, subset: str, sp, weight, bias, beam: int, ctc_weights: list[float]) -> dict:
    """{system: {utt: hypothesis}} and the references, for one subset."""
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    manifest = json.loads((Path(task.args.data) / f"{subset}.json").read_text())["utts"]
    refs = {u: manifest[u]["output"]["text"].strip() for u in manifest}
    d = task.target_dictionary
    blank, eos = d.pad(), d.eos()  # the criterion's CTC blank is the padding symbol
    generator = SequenceGenerator([model], d, beam_size=beam, max_len_b=200)

    def text(tokens):
        tokens = [t for t in tokens if t != eos]
        return sp.decode_pieces(d.string(torch.tensor(tokens)).split()).strip() if tokens else ""

    systems = (["attention"] + [f"rescored w={w:g}" for w in ctc_weights] + [f"oracle of {beam}-best", "CTC greedy"]
               + ([f"joint w={w:g}" for w in ctc_weights] if has_ctc_head(model) else []))
    hyps = {s: {} for s in systems}
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=60000, max_positions=(1e9, 1e9)).next_epoch_itr(
        shuffle=False)
    with torch.no_grad():
        for sample in itr:
            outputs = generator.generate([model], sample)
            enc = model.encoder(**{k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"})
            lprobs = F.log_softmax(enc["encoder_out"] @ weight.T + bias, dim=-1)  # T x B x V
            mask = enc["encoder_padding_mask"]
            for j, index in enumerate(sample["id"].tolist()):
                utt = dataset.ids[index]
                frames = int((~mask[:, j]).sum()) if mask is not None else lprobs.size(0)
                cands = []
                for hypo in outputs[j]:
                    tokens = [t for t in hypo["tokens"].tolist() if t != eos]
                    ctc = -F.ctc_loss(lprobs[:frames, j:j + 1], torch.tensor([tokens]), torch.tensor([frames]),
                                      torch.tensor([len(tokens)]), blank=blank, reduction="sum").item() \
                        if tokens else float("-inf")
                    cands.append((hypo["positional_scores"].sum().item(), ctc, text(tokens)))
                hyps["attention"][utt] = cands[0][2]  # the beam's best (length-normalised score)
                for w in ctc_weights:
                    hyps[f"rescored w={w:g}"][utt] = max(cands, key=lambda c: (1 - w) * c[0] + w * c[1])[2]
                hyps[f"oracle of {beam}-best"][utt] = min(
                    cands, key=lambda c: jiwer.wer(refs[utt], c[2]) if c[2] else float("inf"))[2]
                hyps["CTC greedy"][utt] = text(collapse(lprobs[:frames, j].argmax(-1).tolist(), blank))
    if has_ctc_head(model):
        for w in ctc_weights:
            rows = decode_subset(model, task, subset, sp, beam=beam, max_len_b=200, progress=False, ctc_weight=w)
            hyps[f"joint w={w:g}"] = {u: h for u, _, h in rows}
    return {"refs": refs, "hyps": hyps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model with a CTC head (or a training "
                        "checkpoint whose criterion state holds one)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--subsets", default="dev-clean,test-clean,test-other")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--ctc-weights", default="0.3,0.5,0.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.ctc_weights.split(",") if w]
    if any(not 0 < w < 1 for w in weights):
        raise SystemExit(f"--ctc-weights must lie in (0, 1), got {weights}")
    model, task = load_checkpoint(args.checkpoint, args.data)
    weight, bias = ctc_projection(args.checkpoint, model)
    sp = spm.SentencePieceProcessor(model_file=str(find_spm_model(args.data)))
    subsets = [s for s in args.subsets.split(",") if s]
    table = {}
    for subset in subsets:
        out = decode(model, task, subset, sp, weight, bias, args.beam, weights)
        utts = list(out["refs"])
        for system, hyps in out["hyps"].items():
            table.setdefault(system, {})[subset] = word_error_rate(
                [out["refs"][u] for u in utts], [hyps[u] for u in utts])["wer"]
    base = table["attention"]
    print(f"| WER %, beam {args.beam} | " + " | ".join(subsets) + " |")
    print("|---|" + "---:|" * len(subsets))
    for system, row in table.items():
        cells = [f"{row[s]:.2f}" + ("" if system == "attention" else f" (x{row[s] / base[s]:.2f})") for s in subsets]
        print(f"| {system} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
