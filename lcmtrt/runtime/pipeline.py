"""Text-to-image, image-to-image and inpainting over any backend. Buffers and bindings are made once per (batch, plan) and kept
in a bounded LRU (programs.py); a request only writes its inputs, launches [vae_encode ->] text -> N x denoise ->
vae_decode, and reads the images. Rows are cut into launches of the built batch sizes by measured cost (cover.py)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lcmtrt.runtime import inpaint
from lcmtrt.runtime import noise as noise_source
from lcmtrt.runtime.backends import Backend, open_backend
from lcmtrt.bundle import Bundle, load_bundle
from lcmtrt.errors import RefitError, UserError
from lcmtrt.runtime.conditioning import adapter_inputs, control_inputs, inpaint_images, per_row as _per_row
from lcmtrt.runtime.cover import cheapest_cover, linear_costs
from lcmtrt.runtime.embeddings import guidance_embedding
from lcmtrt.runtime.programs import DEFAULT_MAX_PROGRAMS, Programs
from lcmtrt.runtime.rows import BatchKey, PreparedRows
from lcmtrt.runtime.scheduler import StepPlan, choose_sampler
from lcmtrt.runtime.settings import GenerationSettings
from lcmtrt.runtime.tokenizer import load_tokenizers

log = logging.getLogger(__name__)


@dataclass
class Generation:
    images: np.ndarray  # uint8 [rows, H, W, 3]
    latents: np.ndarray  # float32 [rows, C, h, w]: the last step's denoised latents, as decoded
    seeds: int | list[int]
    timesteps: list[int]
    noise: str  # "torch" (diffusers-identical) or "numpy"
    engine_seconds: float = 0.0  # from each launch to its outputs being read: the rest of a request is host overhead
    batches: list[int] = field(default_factory=list)  # the engine batch size of each launch


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend, max_step_programs: int = DEFAULT_MAX_PROGRAMS):
        self.bundle, self.backend = bundle, backend
        self.tokenizers = load_tokenizers(bundle)  # SD1.5: one; SDXL: CLIP ViT-L's and OpenCLIP bigG's
        self.id_inputs = [t.name for t in bundle.engines["text"].inputs]  # input_ids[, input_ids_2], same order
        if len(self.id_inputs) != len(self.tokenizers):
            raise UserError(f"bundle {bundle.root} pairs {len(self.tokenizers)} tokenizers with a text engine taking "
                            f"{self.id_inputs}; rebuild it")
        self._store = Programs(bundle, backend, max_step_programs)
        self.encode_noises = self._store.encode_noises
        self.inpaint_draws = inpaint.draw_names(bundle) if bundle.inpaint else ()  # leading draws of inpainting
        self._batches, self._programs = self._store.batches, self._store.programs
        # seconds one launch takes at each built batch size: how rows are cut (cover.py); measured at warm-up
        self.batch_costs: dict[int, float] = linear_costs(bundle.batch_sizes)
        self.noise = noise_source.choose_source()  # "torch" (diffusers' numbers) or "numpy": said in every answer
        self.use_torch = self.noise == "torch"
        self._unusable: str | None = None  # set when a failed LoRA swap left the weights half-replaced

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "auto",
             max_step_programs: int = DEFAULT_MAX_PROGRAMS) -> Pipeline:
        bundle = load_bundle(bundle_dir)
        return cls(bundle, open_backend(bundle, device), max_step_programs)

    @property
    def max_step_programs(self) -> int:
        """How many step programs (batch, plan, img2img, CFG) are kept; the least recently used goes beyond."""
        return self._store.limit

    @max_step_programs.setter
    def max_step_programs(self, limit: int) -> None:
        self._store.limit = limit

    @property
    def program_count(self) -> int:
        """Step programs kept now (at most max_step_programs)."""
        return len(self._programs)

    def resident_programs(self) -> list[dict[str, Any]]:
        """The step programs kept now, least recently used first: what a request can run without binding."""
        return self._store.describe()

    def generate(self, prompts: Sequence[str], seed: int | Sequence[int] | None = None,
                 settings: GenerationSettings | None = None, **given: Any) -> Generation:
        """One image per prompt. `seed` is one int for the batch (like diffusers' `torch.manual_seed(seed)`) or one
        per row (like a list of generators); None draws one. `settings`, or the same as keyword arguments."""
        seeds = _seeds(seed)
        rows = self.prepare(prompts, seeds, GenerationSettings.of(settings, **given))
        done = self.run(rows)
        return replace(done, seeds=seeds)

    def generate_pieces(self, prompts: Sequence[str], seed: int | Sequence[int] | None = None,
                        piece: int | None = None, settings: GenerationSettings | None = None,
                        **given: Any) -> Iterator[Generation]:
        """generate() in consecutive pieces of at most `piece` rows (default: the largest built batch), each yielded
        as soon as its images exist: memory bounded by a piece, the same images as one generate() call. Per-row
        settings (images, control and adapter images, negative prompts, guidance scales) are cut with the rows."""
        settings = GenerationSettings.of(settings, **given)
        prompts = list(prompts)
        seeds = _seeds(seed)
        if isinstance(seeds, list) and len(seeds) != len(prompts):
            raise UserError(f"{len(seeds)} seeds given for {len(prompts)} images; give one seed or one per image")
        stream = noise_source.NoiseStream(seeds, len(prompts), self.use_torch, *self._sharing(settings))
        piece = piece or max(self.bundle.batch_sizes)
        if not stream.exact_for(self.bundle.latent_shape):  # torch's normals come in blocks of 16 values
            piece = len(prompts)
        for start in range(0, len(prompts), piece):
            cut = slice(start, start + piece)
            shared = ("control_images",) if self.bundle.control_nets > 1 else ()  # one map per ControlNet
            yield replace(self.run(self.prepare(prompts[cut], stream, settings.piece(cut, len(prompts), shared))),
                          seeds=seeds)

    def prepare(self, prompts: Sequence[str], seed: int | Sequence[int] | noise_source.NoiseStream,
                settings: GenerationSettings | None = None) -> PreparedRows:
        """Validate a request, tokenize it and draw all its noise, one row per prompt; no engine runs."""
        self._require_usable()
        s = settings or GenerationSettings()
        prompts = list(prompts)
        rows = len(prompts)
        if rows == 0:
            raise UserError("no prompt given")
        given = s.guidance_scale if s.guidance_scale is not None else self.bundle.default_guidance_scale
        given = np.broadcast_to(np.asarray(given, np.float64), (rows,))  # as given: the embedding starts from it
        scales = given.astype(np.float32)
        cfg = self._uses_cfg(scales, bool(s.negative_prompts and any(s.negative_prompts)))
        plan, leading = self._plan(s)
        firsts, step_noise = self._draw(seed, rows, leading, self._sharing(s), plan)
        if leading == ("latents",) and plan.init_sigma != 1.0:  # diffusers: latents * init_noise_sigma (Euler's)
            firsts[0] = firsts[0] * np.float32(plan.init_sigma)
        sources = None if s.images is None else _per_row(s.images, rows, "input images")
        inputs, doubled = self._text_and_guidance_inputs(prompts, s.negative_prompts, given, cfg)
        factors = self._conditioning_inputs(inputs, doubled, s, rows, plan, cfg)
        inputs.update(self._inpaint_inputs(s, rows))
        masked = s.masks is not None
        return PreparedRows(BatchKey(plan, sources is not None and not masked, cfg, masked), inputs,
                            frozenset(doubled), firsts, np.ascontiguousarray(step_noise.swapaxes(0, 1)), sources,
                            factors)

    def _plan(self, s: GenerationSettings) -> tuple[StepPlan, tuple[str, ...]]:
        """The step plan of the request's sampler, and the names of its leading draws in diffusers' order: the
        initial latents, or the encoder's noises."""
        sampler = choose_sampler(self.bundle, s.scheduler, s.steps, s.timesteps, s.eta, s.original_inference_steps,
                                 s.masks is not None)
        if s.masks is not None:
            self._check_inpaint(s)
            return sampler.img2img(self.bundle.scheduler, s.resolved_strength, "classic"), self.inpaint_draws
        if self.bundle.inpaint == "unet9":
            raise UserError(f"bundle {self.bundle.root} holds a 9-channel inpainting UNet, which only inpaints: give "
                            "an image and a mask (--image, --mask)")
        if s.images is None:
            return sampler.plan(self.bundle.scheduler), ("latents",)
        if "vae_encode" not in self.bundle.engines:
            raise UserError(f"bundle {self.bundle.root} has no vae_encode engine; rebuild it with img2img = true")
        shape = (self.bundle.height, self.bundle.width, 3)
        if any(np.shape(image) != shape for image in s.images):
            raise ValueError(f"input images must be uint8 arrays of shape {shape}")
        return sampler.img2img(self.bundle.scheduler, s.resolved_strength, s.img2img_mode), tuple(self.encode_noises)

    def _check_inpaint(self, s: GenerationSettings) -> None:
        """diffusers' inpaint pipelines drop the first steps by strength as classic image-to-image does."""
        if self.bundle.inpaint is None:
            raise UserError(f"bundle {self.bundle.root} was built without inpainting; rebuild it with "
                            "`lcmtrt build-engines --inpaint` (or a 9-channel inpainting model)")
        if s.images is None:
            raise UserError("a mask needs the image it repaints (--image)")
        if s.img2img_mode != "classic":
            raise UserError("inpainting drops the first steps by --strength as diffusers' inpaint pipelines do; "
                            "--img2img-mode lcm does not apply")
        shape = (self.bundle.height, self.bundle.width, 3)
        if any(np.shape(image) != shape for image in s.images):
            raise UserError(f"input images must be uint8 arrays of shape {shape}")

    def _sharing(self, s: GenerationSettings) -> tuple[bool, bool, frozenset[str]]:
        """Which leading draws one shared image (and mask) make once, and which diffusers skips (noise.py)."""
        shared_image = s.images is not None and len(s.images) == 1
        if s.masks is None or self.bundle.inpaint is None:
            return shared_image, False, frozenset()
        return (shared_image, len(s.masks) == 1,
                inpaint.skipped_draws(self.bundle.inpaint, s.resolved_strength))

    def _inpaint_inputs(self, s: GenerationSettings, rows: int) -> dict[str, np.ndarray]:
        """The masks (full size for the encoder, latent size for denoise) and each row's start, or a blend bundle's
        neutral inputs for rows without a mask."""
        route = self.bundle.inpaint
        if s.masks is None:
            return inpaint.neutral_inputs(self.bundle, rows) if route == "blend" else {}
        masks = inpaint.binarize(s.masks, self.bundle.height, self.bundle.width)
        inpaint.warn_full_masks(masks, route)
        full = _per_row(list(masks), rows, "masks")
        # diffusers' is_strength_max: at strength 1 the start latents are the noise itself
        keep = np.full(rows, 0.0 if s.resolved_strength == 1.0 else 1.0, np.float32)
        inputs = {"mask": inpaint.latent_mask(full, self.bundle.vae_scale_factor), "keep_image": keep}
        return {**inputs, "mask_image": full} if route == "unet9" else inputs

    def _draw(self, seed: int | Sequence[int] | noise_source.NoiseStream, rows: int, leading: tuple[str, ...],
              sharing: tuple[bool, bool, frozenset[str]], plan: StepPlan) -> tuple[list[np.ndarray], np.ndarray]:
        """Every random draw of the request, in diffusers' order: the leading draws (by name), then each step's
        noise. Which leading draws one shared input image makes once is decided by name (noise.leading_rows)."""
        if isinstance(seed, noise_source.NoiseStream):  # a piece of a longer run: its rows of the run's draws
            return seed.take(rows, self.bundle.latent_shape, leading, plan.steps, plan.noise_draws)
        seeds = _seeds(seed)
        if isinstance(seeds, list) and len(seeds) != rows:
            raise UserError(f"{len(seeds)} seeds given for {rows} images; give one seed or one per image")
        counts = noise_source.leading_rows(leading, rows, *sharing)
        return noise_source.draw(seeds, rows, self.bundle.latent_shape, counts, plan.steps, self.use_torch, leading,
                                 draws=plan.noise_draws, first_only=noise_source.first_generator_only(leading,
                                                                                                     *sharing[:2]))

    def _text_and_guidance_inputs(self, prompts: list[str], negative_prompts: Sequence[str] | None, scales: np.ndarray,
                     cfg: bool) -> tuple[dict[str, np.ndarray], set[str]]:
        """Token ids and guidance inputs (`scales`: float64, as given). Doubled inputs are [rows, 2, ...], negative
        first, for CFG's [negative; positive] text rows."""
        rows = len(prompts)
        inputs: dict[str, np.ndarray] = {}
        doubled: set[str] = set()
        negatives = list(negative_prompts or [""])
        negatives = negatives * rows if len(negatives) == 1 else negatives
        if cfg and len(negatives) != rows:
            raise UserError(f"{len(negatives)} negative prompts for {rows} prompts; give one or one per prompt")
        for name, tokenizer in zip(self.id_inputs, self.tokenizers):
            ids = tokenizer.encode(prompts)
            inputs[name] = np.stack([tokenizer.encode(negatives), ids], axis=1) if cfg else ids
            doubled.update([name] if cfg else [])
        denoise_inputs = self.bundle.engines["denoise_cfg" if cfg else "denoise"].input_names
        if "guidance_scale" in denoise_inputs:
            inputs["guidance_scale"] = scales.astype(np.float32)
        if "guidance_embedding" in denoise_inputs:
            inputs["guidance_embedding"] = guidance_embedding(scales, self.bundle.embeddings["guidance_embedding"])
        if "uncond_mask" in denoise_inputs:
            # SDXL's force_zeros_for_empty_prompt: no negative prompt at all means zero negative embeddings
            zeros = not negative_prompts and self.bundle.text.zero_empty_negative
            inputs["uncond_mask"] = np.full(rows, 0.0 if zeros else 1.0, np.float32)
        return inputs, doubled

    def _conditioning_inputs(self, inputs: dict[str, np.ndarray], doubled: set[str], s: GenerationSettings,
                             rows: int, plan: StepPlan, cfg: bool) -> dict[str, np.ndarray]:
        """ControlNet, T2I-Adapter and SDXL micro-conditioning inputs, added to `inputs`; returns the per-step
        factors."""
        denoise_inputs = self.bundle.engines["denoise_cfg" if cfg else "denoise"].input_names
        factors: dict[str, np.ndarray] = {}
        controls = control_inputs(self.bundle, s.control_images, rows, plan, s.control_scale, s.control_start,
                                        s.control_end)
        if controls is not None:
            inputs.update(controls[0])
            # [rows, steps], or [rows, steps, N] for N ControlNets
            factors["control_scale"] = np.tile(controls[1], (rows,) + (1,) * controls[1].ndim)
        adapted = adapter_inputs(self.bundle, s.adapter_images, rows, plan, s.adapter_scale, s.adapter_factor)
        if adapted is not None:
            inputs["adapter_image"] = adapted[0]
            inputs["adapter_scale"] = np.full(rows, s.adapter_scale, np.float32)
            factors["adapter_keep"] = np.tile(np.asarray(adapted[1], np.float32), (rows, 1))
        if "time_ids" in denoise_inputs:
            size = (self.bundle.height, self.bundle.width)
            row = np.tile(np.asarray([*(s.original_size or size), *s.crop_top_left, *(s.target_size or size)],
                                     np.float32), (rows, 1))
            inputs["time_ids"] = np.stack([row, row], axis=1) if cfg else row
            doubled.update(["time_ids"] if cfg else [])
        return factors

    def run(self, rows: PreparedRows) -> Generation:
        """Images for prepared rows (of one request or several joined), in engine batches of the built sizes.
        Each row's numbers come from its own inputs only; `seeds` of the result is left empty."""
        pieces = [done for _, done in self.run_pieces(rows)]
        if len(pieces) == 1:
            return pieces[0]
        return Generation(np.concatenate([p.images for p in pieces]), np.concatenate([p.latents for p in pieces]),
                          [], pieces[0].timesteps, pieces[0].noise, sum(p.engine_seconds for p in pieces),
                          [b for p in pieces for b in p.batches])

    def run_pieces(self, rows: PreparedRows) -> Iterator[tuple[int, Generation]]:
        """run() one launch at a time: (first row, that launch's rows' Generation) as soon as each is read, so a
        server can answer a request whose rows are done while the rest of the batch runs. The rows are cut by
        `batch_costs` (cheapest_cover): padded into a larger batch where one launch costs less than the pieces."""
        self._require_usable()
        plan, img2img, cfg, masked = rows.key.plan, rows.key.img2img, rows.key.cfg, rows.key.inpaint
        start = 0
        for count, batch in cheapest_cover(len(rows), self._costs()):
            pad = lambda array: _pad_rows(array[start:start + count], batch)
            program = self._store.get(batch, plan, img2img, cfg, masked)
            buffers = self._store.buffers(batch, cfg)
            # by name: shared buffers, or the inpaint encoder's own (mask_image, keep_image, its noises)
            owned = program.encoder.inputs if program.encoder is not None else {}
            target = lambda name: buffers.shared[name] if name in buffers.shared else owned.get(name)
            for name, array in rows.inputs.items():
                if name in rows.doubled:
                    buffers.shared[name].write(np.concatenate([pad(array[:, 0]), pad(array[:, 1])]))
                else:
                    target(name).write(pad(array))
            if masked:
                program.encoder.images.write(pad(rows.sources))
                for name, drawn in zip(self.inpaint_draws, rows.firsts):
                    if target(name) is not None:  # the blend route's masked image sample is drawn, never used
                        target(name).write(pad(drawn))
            elif program.encoder is None:
                buffers.latents[0].write(pad(rows.firsts[0]))
            else:
                program.encoder.images.write(pad(rows.sources))
                for buffer, drawn in zip(program.encoder.noises, rows.firsts):
                    buffer.write(pad(drawn))
            for step, buffer in enumerate(program.noise):
                buffer.write(pad(rows.step_noise[:, step]))
            for name, step_buffers in program.step_inputs.items():
                for step, buffer in enumerate(step_buffers):
                    buffer.write(np.ascontiguousarray(pad(rows.factors[name][:, step])))
            launched = time.perf_counter()
            program.launch()
            images, latents = buffers.images.read()[:count].copy(), buffers.denoised.read()[:count].copy()
            yield start, Generation(images, latents, [], plan.timesteps.tolist(), self.noise,
                                    time.perf_counter() - launched, [batch])
            start += count

    def _costs(self) -> dict[int, float]:
        """batch_costs of the built sizes; where one lacks a cost, every launch is taken to cost its batch size."""
        sizes = self.bundle.batch_sizes
        if any(size not in self.batch_costs for size in sizes):
            return linear_costs(sizes)
        return {size: float(self.batch_costs[size]) for size in sizes}

    def measure_batch_costs(self, settings: GenerationSettings | None = None, repeats: int = 3) -> dict[int, float]:
        """Time one whole run at each built batch size (the default plan, or `settings`'), the fastest of `repeats`
        after a first run that binds and captures; the result becomes `batch_costs`, which cuts later runs."""
        costs, settings = {}, self.runnable(settings)
        for size in self.bundle.batch_sizes:
            rows = self.prepare(["warm up"] * size, 0, settings)
            self.run(rows)  # binds, allocates and captures: not timed
            times = []
            for _ in range(max(1, repeats)):
                started = time.perf_counter()
                self.run(rows)
                times.append(time.perf_counter() - started)
            costs[size] = min(times)
        self.batch_costs = costs
        return costs

    def warm_up(self, settings: GenerationSettings | None = None,
                costs: dict[int, float] | None = None) -> dict[str, Any]:
        """Bind and capture what a server will likely run: image-to-image (with `settings`' strength and mode) at
        each built batch size when the bundle has an encoder, then the default text-to-image plan at each size,
        timed into `batch_costs` (or run once each, with `costs`, seconds per size, as given). Returns exactly what
        is warm: the step programs kept (at most max_step_programs) and the milliseconds of a run at each size."""
        s, given = settings or GenerationSettings(), costs is not None
        if "vae_encode" in self.bundle.engines:  # first, so that text-to-image stays kept under a tight limit
            source = [np.zeros((self.bundle.height, self.bundle.width, 3), np.uint8)]
            for size in self.bundle.batch_sizes:
                self.run(self.prepare(["warm up"] * size, 0, replace(s, images=source)))
        if not given:
            self.measure_batch_costs(replace(s, images=None))
        else:
            for size in self.bundle.batch_sizes:
                self.run(self.prepare(["warm up"] * size, 0, self.runnable(replace(s, images=None))))
            self.batch_costs = {int(size): float(seconds) for size, seconds in costs.items()}
        return {"programs": self.resident_programs(), "batch_ms_source": "given" if given else "measured",
                "batch_ms": {str(size): round(seconds * 1000, 3) for size, seconds in self.batch_costs.items()}}

    def runnable(self, settings: GenerationSettings | None) -> GenerationSettings | None:
        """A 9-channel inpainting bundle runs inpainting only: warm-up and timing give it a blank image and a mask
        repainting everything (conditioning.inpaint_images); any other bundle's settings pass as they are."""
        inputs = inpaint_images(self.bundle)
        if not inputs or (settings is not None and settings.masks is not None):
            return settings
        return replace(settings or GenerationSettings(), **inputs)

    def require_refittable(self) -> None:
        """Refuse a weight swap this bundle or backend cannot take, before any weights are computed."""
        self._require_usable()
        if not any(engine.refit_weights for engine in self.bundle.engines.values()):
            raise UserError(f"bundle {self.bundle.root} was built without --refittable; rebuild it with "
                            "`lcmtrt build-engines --refittable` to swap LoRAs")
        if getattr(self.backend, "refit", None) is None:
            raise UserError(f"the {self.backend.name} backend cannot swap weights")

    def refit(self, weights: dict[str, dict[str, np.ndarray]]) -> None:
        """Replace refittable weights ({engine: {weight name: array}}, from lcmtrt.export.refit) without rebuilding.
        Buffers and bindings are kept (the backend swaps weights under them); a swap that fails after some weights
        changed leaves this pipeline unusable rather than running a half-swapped model."""
        self.require_refittable()
        try:
            self.backend.refit(weights)
        except RefitError as e:
            if e.changed:
                self._unusable = (f"this pipeline is unusable: a LoRA swap failed after replacing some weights ({e}); "
                                  "load the bundle again")
            raise

    def _require_usable(self) -> None:
        if self._unusable is not None:
            raise UserError(self._unusable)

    def _uses_cfg(self, scales: np.ndarray, negative_given: bool) -> bool:
        """Classifier-free guidance runs iff the UNet has no guidance embedding and guidance > 1, as in diffusers."""
        mode = self.bundle.guidance_mode
        cfg = mode != "embedding" and bool(np.any(scales > 1.0))
        if cfg and mode == "none":
            raise UserError(f"guidance scale {float(scales.max()):g} needs classifier-free guidance, which bundle "
                            f"{self.bundle.root} was built without; use --guidance-scale 1 or rebuild it with --cfg")
        if negative_given and not cfg:
            why = ("this LCM-distilled model takes guidance through its embedding and never runs classifier-free "
                   "guidance" if mode == "embedding" else "guidance <= 1 runs no classifier-free guidance")
            log.warning("warning: negative prompts are ignored: %s (diffusers ignores them too)", why)
        return cfg

    def stage_times(self, batch: int, steps: int, **sampler: Any) -> dict[str, float]:
        """Seconds each engine takes, run one at a time on the inputs of the last request at this batch size;
        `sampler`: the request's scheduler, eta and timesteps, as generate() takes them."""
        self._require_usable()
        s = self.runnable(GenerationSettings(steps=steps, **sampler))  # 9-channel inpainting bundles inpaint
        plan, _ = self._plan(s)  # the plan a request of `steps` runs
        program = self._store.get(batch, plan, False, False, s.masks is not None)
        buffers = self._store.buffers(batch, False)
        timed = self.backend.timed
        times = {"text": timed(buffers.text.run)}
        times.update({f"denoise[{i}]": timed(binding.run) for i, binding in enumerate(program.bindings)})
        times["vae_decode"] = timed(buffers.vae_decode.run)
        return times


def _seeds(seed: int | Sequence[int] | None) -> int | list[int]:
    """One seed for the batch, one per row, or a fresh random one."""
    if seed is None:
        return random.randrange(2**31)
    return int(seed) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


def _pad_rows(array: np.ndarray, batch: int) -> np.ndarray:
    """Repeat the last row up to the engine's batch size (the extra rows are computed and dropped)."""
    missing = batch - len(array)
    return array if missing == 0 else np.concatenate([array, array[[-1] * missing]])
