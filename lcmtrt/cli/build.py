"""`lcmtrt build-engines`, `verify` and `presets`: the commands that make and check bundles."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lcmtrt.cli.args import bounded, bounded_list, device_arg
from lcmtrt.errors import UserError


def add_build_commands(commands: argparse._SubParsersAction) -> None:
    build = commands.add_parser("build-engines", help="export a model and build its engine bundle")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in preset (see `lcmtrt presets`)")
    source.add_argument("--config", help="a preset TOML file")
    source.add_argument("--from", dest="source_bundle", type=Path, metavar="BUNDLE",
                        help="reuse this bundle's ONNX graphs: engines for another --backend / --precision, no export")
    build.add_argument("--model", help="hub id, local diffusers folder, or one .safetensors file in the original "
                                       "Stable Diffusion layout (SD1.5- or SDXL-class), replacing the preset's model")
    build.add_argument("--model-config", metavar="DIR_OR_ID",
                       help="a single-file --model's architecture: a diffusers folder or hub id whose configs match "
                            "(needed offline; online diffusers guesses it from the file's keys)")
    build.add_argument("--out", type=Path, help="bundle folder (default: artifacts/<preset>)")
    build.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime", "openvino"), default="auto",
                       help="auto: TensorRT on a GPU with it, ONNX Runtime CUDA on another GPU, else OpenVINO when "
                            "installed, else ONNX Runtime CPU")
    build.add_argument("--precision", choices=("fp16", "fp32", "bf16", "int8"),
                       help="default: fp16 on a GPU, fp32 on a CPU; bf16: OpenVINO on CPUs with avx512_bf16 or AMX; "
                            "int8: OpenVINO on CPUs, the UNet quantized with NNCF on a calibration set the build "
                            "makes, text encoder and VAE weight-only int8")
    build.add_argument("--int8-vae", choices=("weights", "activations"),
                       help="with --precision int8, what the VAE decoder gets: weights (default: weight-only int8, as "
                            "optimum-intel's hybrid mode) or activations (weights and activations int8, calibrated "
                            "on the calibration's final latents: 1.4-3x faster decoding by CPU, and more pixels lost)")
    build.add_argument("--device", type=device_arg, default="auto",
                       help="the device the engines are built for, in infer's vocabulary (any case): auto (TensorRT's "
                            "GPU; ONNX Runtime's CUDA where usable, else cpu; OpenVINO's CPU), cpu, cuda or gpu, or "
                            "an OpenVINO device such as gpu.1 or npu")
    build.add_argument("--height", type=bounded("height"))
    build.add_argument("--width", type=bounded("width"))
    build.add_argument("--batch", type=bounded_list("batch"), help="batch sizes to build, e.g. 1,4")
    build.add_argument("--workspace-gb", type=bounded("workspace_gb"), help="TensorRT builder workspace limit")
    build.add_argument("--lora", action="append", default=[], metavar="ID_OR_FILE[:WEIGHT]",
                       help="fuse a LoRA (.safetensors; hub id, file or folder), added to the preset's; repeatable")
    build.add_argument("--controlnet", action="append", default=[], metavar="ID_OR_DIR",
                       help="hub id or folder of a ControlNet replacing the preset's; repeat it for a MultiControlNet "
                            "(one control image per ControlNet at infer, in this order)")
    build.add_argument("--adapter", help="hub id or folder of a T2I-Adapter replacing the preset's")
    build.add_argument("--refittable", action="store_true",
                       help="keep LoRA-touchable weights replaceable, for `infer --lora` without a rebuild")
    build.add_argument("--inpaint", action="store_true",
                       help="also build inpainting (infer --mask): a 4-channel UNet blends the source outside the mask "
                            "after each step; a 9-channel inpainting UNet needs no flag")
    build.add_argument("--cfg", action="store_true",
                       help="also build classifier-free guidance (UNets without a guidance embedding, e.g. LCM-LoRA)")



def add_bundle_commands(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser("verify", help="hash every file of a bundle against bundle.json")
    verify.add_argument("--engines", type=Path, required=True, help="bundle folder from build-engines")

    commands.add_parser("presets", help="list the built-in presets")


def cmd_build(args: argparse.Namespace) -> int:
    from lcmtrt.engines.build import build_bundle, convert_bundle
    from lcmtrt.engines.preset import load_preset

    if args.source_bundle is not None:
        given = [f for f in ("model", "model_config", "height", "width", "controlnet", "adapter") if getattr(args, f)]
        if given or args.lora or args.cfg or args.refittable or args.inpaint:
            raise UserError(f"--from reuses a bundle's ONNX graphs as they are; --{(given or ['lora/cfg/refittable/inpaint'])[0].replace('_', '-')} "
                            "needs a new export (--preset or --config)")
        out = args.out or Path("artifacts") / f"{args.source_bundle.name}-{args.backend}-{args.precision or 'default'}"
        convert_bundle(args.source_bundle, out, backend=args.backend, precision=args.precision,
                       workspace_gb=args.workspace_gb, device=args.device, batch_sizes=args.batch,
                       int8_vae=args.int8_vae)
        print(out)
        return 0

    from dataclasses import replace

    preset = load_preset(args.preset, args.config)
    if args.model:  # a whole checkpoint of the user's: its own UNet and VAE, not the preset's replacements
        preset = replace(preset, model=args.model, unet=None, vae=None, model_config=args.model_config)
    elif args.model_config:  # the architecture of the preset's own single file
        preset = replace(preset, model_config=args.model_config)
    from lcmtrt.export.lora import LoraSpec

    preset = preset.with_overrides(height=args.height, width=args.width, batch_sizes=args.batch,
                                   loras=preset.loras + tuple(LoraSpec.parse(text) for text in args.lora) or None,
                                   cfg=args.cfg or None, inpaint=args.inpaint or None,
                                   controlnet=_controlnets(args.controlnet),
                                   adapter=args.adapter)
    out = args.out or Path("artifacts") / preset.name
    build_bundle(preset, out, backend=args.backend, precision=args.precision, workspace_gb=args.workspace_gb,
                 refittable=args.refittable, device=args.device, int8_vae=args.int8_vae)
    print(out)
    return 0


def _controlnets(given: list[str]) -> str | tuple[str, ...] | None:
    """--controlnet as the preset's setting: none given keeps the preset's, one is one ControlNet, several a
    MultiControlNet in the order given."""
    return None if not given else given[0] if len(given) == 1 else tuple(given)


def cmd_verify(args: argparse.Namespace) -> int:
    from lcmtrt.bundle import verify_bundle

    start = time.perf_counter()
    bundle, problems = verify_bundle(args.engines)
    if problems:
        for line in problems:
            print(f"lcmtrt: damaged: {line}", file=sys.stderr)
        raise UserError(f"{len(problems)} damaged file(s) in {args.engines}; rebuild it with `lcmtrt build-engines`")
    total = sum(d["size"] for d in bundle.files.values())
    print(f"{args.engines}: {len(bundle.files)} files, {total / 2**30:.2f} GiB, all match bundle.json "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lcmtrt.engines.preset import load_preset, preset_names

    for name in preset_names():
        print(f"{name:24s} {load_preset(name).description}")
    return 0
