"""``prato-app --ckpt PATH``: a local browser page to segment an image with a box you draw.

Upload an image (or pick a bundled phantom sample), draw a box on it (or type its pixel edges), and
see the mask over the image, the token-retention map, the tokens kept, the GFLOPs and the time of the
pruned network next to the same weights unpruned, both measured on this machine. A ``q`` slider
(for pruners whose ``q`` no learned part depends on) re-runs the image as it moves, so the
accuracy/speed trade-off can be watched; without ground truth the accuracy shown is the agreement
with the unpruned mask (and the Dice with the phantom's ground truth for samples).

Offline and private: listens on 127.0.0.1 unless ``--host`` says otherwise, no share link, gradio's
analytics off and Hugging Face Hub offline, system fonts only (no web font download). Needs the
``app`` extra: ``pip install -e ".[app]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import gradio as gr

    from prato_exp.inference.segmenter import Prediction, Segmenter

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
"""Set before gradio is imported: no analytics, no version check, no Hub access."""

SAMPLE_COUNT = 3
SAMPLE_SIZE = 160


def _offline() -> None:
    os.environ.update(OFFLINE_ENV)


@dataclass
class Sample:
    """A bundled phantom: ``image`` ``(H, W, 3)`` uint8, its ground truth ``label`` and tight ``box``."""

    name: str
    image: np.ndarray
    label: np.ndarray
    box: np.ndarray


def phantom_samples(in_channels: int, count: int = SAMPLE_COUNT, size: int = SAMPLE_SIZE) -> list[Sample]:
    """Phantoms of the checkpoint's kind, generated on the fly (cardiac for 1 channel, lesion for 3)."""
    from prato_exp.data.phantoms import SyntheticCardiacSource, SyntheticLesionSource
    from prato_exp.data.prompts import tight_box

    if in_channels == 1:
        source = SyntheticCardiacSource(num_train=0, num_val=0, num_test=count, size=size, empty_fraction=0.0)
    else:
        source = SyntheticLesionSource(num_train=0, num_val=0, num_test=count, size=size)
    samples = []
    for case_id in source.split_ids()["test"]:
        case = source.load_case(case_id)
        image = np.round(np.clip(case.image[:, 0], 0, 1) * 255).astype(np.uint8)  # (C, H, W)
        rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
        label = case.label[0]
        box = tight_box(label)
        samples.append(Sample(case_id, np.ascontiguousarray(rgb.transpose(1, 2, 0)), label, box))
    return samples


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean foreground Dice over the classes present in either mask (None when both are empty)."""
    classes = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    if not classes:
        return None
    scores = [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in classes]
    return float(np.mean(scores))


@dataclass
class PageResult:
    """What the page shows after one run."""

    overlay: Any
    retention: Any
    tokens_text: str
    stats_markdown: str
    prediction: Prediction = field(repr=False)


class PageModel:
    """The page's logic without the page: run a prediction and format what is shown (testable alone).

    Args:
        segmenter: the loaded checkpoint.
        repeats: timed forward passes for each of the pruned and unpruned networks (median shown).
    """

    def __init__(self, segmenter: Segmenter, repeats: int = 5) -> None:
        self.segmenter = segmenter
        self.repeats = repeats
        self.samples = phantom_samples(segmenter.in_channels)
        budget = segmenter.budget
        percentile = budget is not None and budget["rule"] == "percentile"
        self.has_q = percentile and "q" in segmenter.allowed_overrides

    def run(
        self, image: np.ndarray, box: Sequence[float], q: float | None = None, label: np.ndarray | None = None
    ) -> PageResult:
        """Segment ``image`` ``(H, W, 3)`` uint8 with ``box``; ``q`` overrides the pruner's (when allowed)."""
        from prato_exp.render import mask_overlay, retention_map

        overrides = (
            {"q": int(q) if float(q).is_integer() else float(q)} if q is not None and self.has_q else {}
        )
        pred = self.segmenter.predict(
            image, np.asarray(box, dtype=np.float64), image_id="uploaded image", unpruned=True,
            repeats=self.repeats, **overrides,
        )  # fmt: skip
        base = pred.unpruned
        assert base is not None
        tokens = f"{pred.tokens_kept} / {pred.tokens_total} tokens kept ({100 * pred.kept_fraction:.1f} %)"
        if pred.tokens_total == 0:
            tokens = "this network has no token grid: nothing is pruned"
        device = str(self.segmenter.device)
        import torch

        rows = [
            "| | pruned | unpruned |",
            "|---|---|---|",
            f"| tokens kept | {pred.tokens_kept} / {pred.tokens_total} "
            f"| {base.tokens_kept} / {base.tokens_total} |",
            f"| GFLOPs | {pred.gflops:.3f} | {base.gflops:.3f} |",
            f"| time, median of {self.repeats} ({device}, {torch.get_num_threads()} threads) "
            f"| {pred.time_ms:.1f} ms | {base.time_ms:.1f} ms |",
        ]
        agreement = _dice(pred.mask, base.mask)
        rows.append(f"| mask Dice vs unpruned | {'-' if agreement is None else f'{agreement:.3f}'} | 1 |")
        if label is not None and label.shape == pred.mask.shape:
            truth, plain = _dice(pred.mask, label), _dice(base.mask, label)
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(f"| Dice vs phantom ground truth | {fmt(truth)} | {fmt(plain)} |")
        pruning = {**self.segmenter.pruning, **overrides}
        shown = ", ".join(f"{k}={pruning[k]}" for k in self.segmenter.allowed_overrides if k in pruning)
        name = (self.segmenter.pruner_target or "no pruner").rsplit(".", 1)[-1]
        rows.append("")
        rows.append(f"Pruner: {name} ({shown}); network input {pred.input_size} px.")
        return PageResult(
            overlay=mask_overlay(image, pred.mask, pred.box_xyxy),
            retention=retention_map(image, pred.keep_grid, pred.box_xyxy),
            tokens_text=tokens,
            stats_markdown="\n".join(rows),
            prediction=pred,
        )


def build_app(model: PageModel) -> gr.Blocks:
    """The gradio page around ``model``."""
    _offline()
    import gradio as gr
    from gradio_image_annotation import image_annotator

    from prato_exp.data.prompts import BoxError

    seg = model.segmenter
    names = [s.name for s in model.samples]
    network = str(seg.run_config.model.get("_target_", "?")).rsplit(".", 1)[-1]
    with gr.Blocks(title="PrATo: segment with a box", analytics_enabled=False) as app:
        gr.Markdown(
            "## PrATo: segment an image with a box\n"
            f"Checkpoint `{seg.checkpoint_path}` ({network}, classes: {', '.join(seg.class_names[1:])}). "
            "Upload an image or pick a sample, draw one box around the structure, press **Segment**. "
            "Boxes are pixel edges of the uploaded image."
        )
        label_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                annotator = image_annotator(
                    label="Image and box",
                    single_box=True,
                    image_type="numpy",
                    image_mode="RGB",
                    sources=["upload"],
                    box_min_size=2,
                    height=360,
                    disable_edit_boxes=True,
                    show_share_button=False,
                    elem_id="annotator",
                )
                with gr.Row():
                    sample = gr.Dropdown(names, label="Phantom sample", value=None, elem_id="sample")
                with gr.Row():
                    x0, y0, x1, y1 = (
                        gr.Number(value=None, label=name, precision=1, elem_id=f"box-{name}")
                        for name in ("x0", "y0", "x1", "y1")
                    )
                gr.Markdown("Drawing a box fills these fields; you can also type them.")
                q = gr.Slider(
                    1,
                    99,
                    value=float((seg.budget or {}).get("q") or 25),
                    step=1,
                    label="q: percent of tokens pruned (re-runs on release)",
                    visible=model.has_q,
                    elem_id="q",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                tokens = gr.Textbox(label="Tokens kept", interactive=False, elem_id="tokens-kept")
                overlay = gr.Image(label="Mask", type="pil", interactive=False, elem_id="mask-overlay")
                retention = gr.Image(
                    label="Retention map (gold: kept tokens, dark: pruned)",
                    type="pil",
                    interactive=False,
                    elem_id="retention",
                )
                stats = gr.Markdown(elem_id="stats")

        def on_boxes(value: dict | None):
            boxes = (value or {}).get("boxes") or []
            if not boxes:
                return gr.update(), gr.update(), gr.update(), gr.update()
            b = boxes[-1]
            return b["xmin"], b["ymin"], b["xmax"], b["ymax"]

        def on_sample(name: str | None):
            chosen = next((s for s in model.samples if s.name == name), None)
            if chosen is None:
                return gr.update(), None, gr.update(), gr.update(), gr.update(), gr.update()
            x_0, y_0, x_1, y_1 = (float(v) for v in chosen.box)
            box = {"xmin": x_0, "ymin": y_0, "xmax": x_1, "ymax": y_1, "label": "box"}
            return {"image": chosen.image, "boxes": [box]}, chosen.label, x_0, y_0, x_1, y_1

        def on_segment(value: dict | None, bx0, by0, bx1, by1, q_value, label):
            if not value or value.get("image") is None:
                raise gr.Error("Upload an image or pick a sample first.")
            if any(v is None for v in (bx0, by0, bx1, by1)):
                raise gr.Error("Draw a box on the image or type x0, y0, x1, y1.")
            try:
                result = model.run(value["image"], [bx0, by0, bx1, by1], q_value, label)
            except (BoxError, ValueError) as err:
                raise gr.Error(str(err)) from err
            return result.overlay, result.retention, result.tokens_text, result.stats_markdown

        annotator.change(on_boxes, inputs=annotator, outputs=[x0, y0, x1, y1])
        annotator.upload(lambda: None, outputs=label_state)
        sample.change(on_sample, inputs=sample, outputs=[annotator, label_state, x0, y0, x1, y1])
        inputs = [annotator, x0, y0, x1, y1, q, label_state]
        outputs = [overlay, retention, tokens, stats]
        button.click(on_segment, inputs=inputs, outputs=outputs)
        q.release(on_segment, inputs=inputs, outputs=outputs)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve ``app`` on ``host:port`` without share link, analytics or web fonts; return its URL."""
    _offline()
    import gradio as gr

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        show_error=True,
        quiet=not block,
        theme=theme,
        footer_links=[],
    )
    return url


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``prato-app``."""
    parser = argparse.ArgumentParser(prog="prato-app", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by prato-train")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per network (median shown)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``prato-app``."""
    args = build_parser().parse_args(argv)
    _offline()
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as err:
        print(f'prato-app: {err}; install the page\'s extra: pip install -e ".[app]"', file=sys.stderr)
        return 2
    from prato_exp.inference.segmenter import Segmenter

    try:
        segmenter = Segmenter.from_checkpoint(args.ckpt, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"prato-app: error: {err}", file=sys.stderr)
        return 2
    launch(build_app(PageModel(segmenter, repeats=args.repeats)), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
