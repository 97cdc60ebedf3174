"""Smoke demo: pack a few documents, run a patched tiny Llama, and check every document against its standalone run.

``python -m anchorcontext demo`` — seconds on a CPU, no download. (The full main job is ``anchorcontext train``.)
"""

from __future__ import annotations

import torch

from .argparsing import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    import transformers

    import anchorcontext as ac

    p = ArgumentParser(prog="anchorcontext demo", description=__doc__)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--mask", choices=ac.MASKS, default="anchor")
    p.add_argument("--backend", default="auto")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    vocab, anchor, pad = 128, 1, 0
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=anchor, pad_token_id=pad)
    model = transformers.LlamaForCausalLM(cfg).eval()
    docs = [[anchor] + torch.randint(3, vocab, (n,)).tolist() for n in (9, 30, 1, 17, 40, 5)]
    rows, stats = ac.pack_documents(docs, seq_len=a.seq_len, anchor_id=anchor, pad_id=pad)
    batch = ac.AnchorCollator(anchor_id=anchor, pad_id=pad, mask=a.mask)(rows)
    ac.patch_model(model, backend=a.backend)
    print(f"packed {stats.documents} documents into {stats.rows} rows of {a.seq_len} tokens "
          f"({stats.split_documents} split, {stats.padding_tokens} padding)")
    with torch.no_grad():
        logits = model(**batch).logits
        layout = batch["anchor_layout"]
        worst = 0.0
        for r in range(layout.batch_size):
            for d in range(1, int(layout.doc_ids[r].max()) + 1):
                idx = (layout.doc_ids[r] == d).nonzero().squeeze(1)
                alone = torch.cat([torch.tensor([0]), idx]) if a.mask == "anchor" else idx
                ids = batch["input_ids"][r, alone][None]
                ref = model(input_ids=ids, position_ids=batch["position_ids"][r, alone][None],
                            attention_mask=torch.ones_like(ids)).logits[0]
                ref = ref[1:] if a.mask == "anchor" else ref
                worst = max(worst, (logits[r, idx] - ref).abs().max().item())
    print(f"mask={a.mask}: max |packed - standalone| logits over all documents = {worst:.2e}")
    return 0 if worst < 1e-4 else 1
