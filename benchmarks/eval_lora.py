"""Before and after a LoRA: detector accuracy of the bundled default model on a new concept's held-out prompts and
on the old held-out prompts (what was forgotten), per caption form, and a contact sheet.

    python benchmarks/eval_lora.py --lora runs/bar-lora/adapter [--concept bar] [--num 50] [--sheet docs/lora-bar.png]

New concept: ``shapes.concept_prompts`` (bars, or hexagons, in the ``shapes.CONCEPT_HELDOUT`` colour pairs, which
the fine-tune's data never holds);
old: ``shapes.heldout_prompts`` (circles, squares, triangles in ``shapes.HELDOUT``, as
``eval_shapes.py``). The same prompts, seeds and sampling settings (the model's defaults) before and after; the
adapter is loaded into the same pipeline (``pipeline.load_lora``).
"""

import argparse

from eval_shapes import KEYS, contact_sheet, evaluate, row, verdict

import mindspore as ms

from mindone_lumina import shapes
from mindone_lumina.pipeline import DEFAULT_MODEL, TextToImagePipeline


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", required=True, help="the adapter folder")
    p.add_argument("--scale", type=float, default=1.0, help="the adapter's scale")
    p.add_argument("--concept", default="bar", choices=shapes.NEW_SHAPES, help="the shape the adapter teaches")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num", type=int, default=50, help="prompts per form and prompt set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG")
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    sets = {
        f"new ({args.concept}, held-out pairs)": {
            f: shapes.concept_prompts(args.num, f, args.seed, args.concept) for f in shapes.FORMS
        },
        "old (held-out triples)": {f: shapes.heldout_prompts(args.num, f, args.seed) for f in shapes.FORMS},
    }
    print(f"# {args.num} prompts per row, seed {args.seed}, MindSpore {ms.__version__} graph mode, CPU; the model's "
          f"default settings {pipe.defaults}; LoRA {args.lora} x {args.scale:g}")  # fmt: skip
    print(f"| prompts | form | model | prompts | {' | '.join(KEYS)} | s/image |")
    print("|---|---|---|---|" + "---|" * (len(KEYS) + 1))
    sheet = []
    for stage in ("before", "after"):
        if stage == "after":
            pipe.load_lora(args.lora, args.scale)
        for name, forms in sets.items():
            for form, prompts in forms.items():
                acc, sec, images = evaluate(pipe, prompts, pipe.defaults, seed=args.seed)
                print(row(f"{name} | {form} | {stage}", len(prompts), acc, sec), flush=True)
                if form == "plain":
                    cells = [(t, im, verdict(t, im)) for t, im in zip(prompts[:8], images[:8])]
                    sheet.append((f"{name}, {stage} the LoRA", cells))
    if args.sheet:
        order = [0, 2, 1, 3]  # new before, new after, old before, old after
        contact_sheet([sheet[i] for i in order], args.sheet)


if __name__ == "__main__":
    main()
