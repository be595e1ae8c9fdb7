"""Step programs: the buffers and bindings a pipeline runs a (batch, plan, img2img, CFG) with, made once and kept in
a bounded LRU.

Each batch size's shared buffers (text, latents, images) are made once and kept: there are at most two per built
batch size. A step program adds what depends on the plan: one noise buffer and one denoise binding per step, the
encoder's inputs for image-to-image, and the captured launch of the whole generation (on TensorRT an execution
context per step and a CUDA graph). Any client can ask for a new plan, so at most `limit` programs are kept; the
least recently used one is released (its buffers, bindings, contexts and graph freed) to make room, and a plan's
coefficient and timestep-embedding buffers go with its last program.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from lcmtrt.bundle import Bundle
from lcmtrt.runtime.backends import Backend, Binding, Buffer
from lcmtrt.runtime.embeddings import time_embedding
from lcmtrt.runtime.scheduler import StepPlan

PER_STEP_FACTORS = ("control_scale", "adapter_keep")  # denoise inputs ([batch], [batch, N]) bound per step
DEFAULT_MAX_PROGRAMS = 16


@dataclass
class BatchBuffers:
    """Everything one batch size needs, allocated once. `shared` holds the tensors engines pass to each other or
    the host writes once per request, by their engine I/O name (input_ids, prompt_embeds, guidance_scale, ...)."""

    denoise: str  # the engine the steps run: denoise, or denoise_cfg with [negative; positive] text rows
    shared: dict[str, Buffer]
    latents: tuple[Buffer, Buffer]  # ping-pong: step i reads latents[i % 2] and writes latents[(i + 1) % 2]
    denoised: Buffer
    images: Buffer
    text: Binding
    vae_decode: Binding
    adapter: Binding | None = None


@dataclass
class Encoder:
    """Image-to-image inputs of one (batch, plan): the source images and the encode stage's noises."""

    images: Buffer
    noises: list[Buffer]  # in draw order: [sample_noise,] noise
    binding: Binding
    inputs: dict[str, Buffer] = field(default_factory=dict)  # inpainting: every input it owns (images too), by name


@dataclass
class Program:
    """One (batch, plan[, img2img]): per-step buffers and the captured launch of the whole generation."""

    plan: StepPlan
    noise: list[Buffer]  # one [batch, C, h, w] buffer per step: each bound tensor is an allocation of its own
    step_inputs: dict[str, list[Buffer]]  # per-step factors: control_scale ([batch] or [batch, N]), adapter_keep
    launch: Callable[[], None]
    bindings: list[Binding] = field(default_factory=list)
    encoder: Encoder | None = None


class ProgramKey(NamedTuple):
    batch: int
    plan: StepPlan
    img2img: bool
    cfg: bool
    inpaint: bool = False


def release(resource: Any) -> None:
    """Free what a buffer, binding or captured launch holds, where its backend has anything to free."""
    free = getattr(resource, "release", None)
    if free is not None:
        free()


class Programs:
    """The batch buffers and the LRU of step programs of one pipeline."""

    def __init__(self, bundle: Bundle, backend: Backend, limit: int = DEFAULT_MAX_PROGRAMS):
        self.bundle, self.backend, self.limit = bundle, backend, limit
        self.batches: dict[tuple[int, bool], BatchBuffers] = {}
        self.programs: OrderedDict[ProgramKey, Program] = OrderedDict()  # least recently used first
        self.coeffs: dict[StepPlan, list[Buffer]] = {}
        self.embeddings: dict[StepPlan, list[Buffer]] = {}
        engine = bundle.engines.get("vae_encode")
        names = {t.name for t in engine.inputs} if engine else set()
        # AutoencoderTiny encodes deterministically: its graph takes no sample noise and diffusers draws none
        self.encode_noises = [n for n in ("sample_noise", "noise") if n in names]  # diffusers' draw order

    def buffers(self, batch: int, cfg: bool) -> BatchBuffers:
        """Under CFG the text engine runs 2 x batch rows ([negative; positive]) into denoise_cfg's inputs."""
        if (batch, cfg) not in self.batches:
            alloc, engines = self.backend.alloc, self.bundle.engines
            denoise, text_batch = ("denoise_cfg", 2 * batch) if cfg else ("denoise", batch)
            latent = (batch, *self.bundle.latent_shape)
            latents, denoised = (alloc(latent, np.float32), alloc(latent, np.float32)), alloc(latent, np.float32)
            images = alloc((batch, self.bundle.height, self.bundle.width, 3), np.uint8)
            per_step = {"latents", "coeffs", "time_embedding", "noise", "next_latents", "denoised", *PER_STEP_FACTORS}
            text_io = engines["text"].inputs + engines["text"].outputs
            shared = {t.name: alloc(t.concrete(text_batch), t.dtype) for t in text_io}
            shared.update({t.name: alloc(t.concrete(batch), t.dtype) for t in engines[denoise].inputs
                           if t.name not in per_step and t.name not in shared})
            text = self.backend.bind("text", text_batch, {t.name: shared[t.name] for t in text_io})
            vae = self.backend.bind("vae_decode", batch, {"latents": denoised, "images": images})
            adapter = None
            if "adapter" in engines:  # its inputs are written per request, its outputs feed every step
                adapter_io = engines["adapter"].inputs + engines["adapter"].outputs
                shared.update({t.name: alloc(t.concrete(batch), t.dtype) for t in engines["adapter"].inputs})
                adapter = self.backend.bind("adapter", batch, {t.name: shared[t.name] for t in adapter_io})
            self.batches[batch, cfg] = BatchBuffers(denoise, shared, latents, denoised, images, text, vae, adapter)
        return self.batches[batch, cfg]

    def get(self, batch: int, plan: StepPlan, img2img: bool, cfg: bool, inpaint: bool = False) -> Program:
        """The program of (batch, plan, img2img, cfg, inpaint), made now if it is not kept (releasing the least
        recently used one when `limit` are kept already)."""
        key = ProgramKey(batch, plan, img2img, cfg, inpaint)
        if key in self.programs:
            self.programs.move_to_end(key)
            return self.programs[key]
        while self.programs and len(self.programs) >= max(1, self.limit):
            self._evict()
        self.programs[key] = self._build(key)
        return self.programs[key]

    def _step_coeffs(self, plan: StepPlan) -> list[Buffer]:
        if plan not in self.coeffs:
            width = len(self.bundle.coeff_columns)  # bundles built before take LCM's first 8 columns
            self.coeffs[plan] = [self.backend.alloc((width,), np.float32) for _ in plan.timesteps]
            for buffer, row in zip(self.coeffs[plan], plan.coeffs):
                buffer.write(np.ascontiguousarray(row[:width]))
        return self.coeffs[plan]

    def _time_embeddings(self, plan: StepPlan) -> list[Buffer]:
        """Each step's timestep embedding, computed once per plan in fp32 (none for bundles built before, which
        compute it inside the graph)."""
        spec = self.bundle.embeddings.get("time_embedding")
        if spec is None:
            return []
        if plan not in self.embeddings:
            self.embeddings[plan] = [self.backend.alloc((spec.dim,), np.float32) for _ in plan.timesteps]
            for buffer, row in zip(self.embeddings[plan], time_embedding(plan.timesteps, spec)):
                buffer.write(row)
        return self.embeddings[plan]

    def _encoder(self, batch: int, coeffs: Buffer, latents: Buffer) -> Encoder:
        b, alloc = self.bundle, self.backend.alloc
        images = alloc((batch, b.height, b.width, 3), np.uint8)
        noises = {name: alloc((batch, *b.latent_shape), np.float32) for name in self.encode_noises}
        binding = self.backend.bind("vae_encode", batch, {"images": images, "coeffs": coeffs, "latents": latents,
                                                          **noises})
        return Encoder(images, list(noises.values()), binding)

    def _inpaint_encoder(self, batch: int, coeffs: Buffer, buffers: BatchBuffers) -> Encoder:
        """The inpaint encoder: it writes the start latents and the latents the denoise engine takes beside them
        (masked_image_latents or image_latents); the blend route's init_noise is the denoise engine's buffer too."""
        engine, alloc = self.bundle.engines["inpaint_encode"], self.backend.alloc
        owned = {t.name: alloc(t.concrete(batch), t.dtype) for t in engine.inputs
                 if t.name != "coeffs" and t.name not in buffers.shared}
        io = {**owned, "coeffs": coeffs, "latents": buffers.latents[0],
              **{t.name: buffers.shared[t.name] for t in (*engine.inputs, *engine.outputs) if t.name in buffers.shared}}
        return Encoder(owned["images"], [], self.backend.bind("inpaint_encode", batch, io), owned)

    def _build(self, key: ProgramKey) -> Program:
        batch, plan, img2img, cfg, inpaint = key
        buffers = self.buffers(batch, cfg)
        coeffs = self._step_coeffs(plan)
        embeddings = self._time_embeddings(plan)
        step_noise = [self.backend.alloc((batch, *self.bundle.latent_shape), np.float32) for _ in plan.timesteps]
        # [batch] each, or [batch, N] for the control_scale of N ControlNets: the shape the engine declares
        factors = [t for t in self.bundle.engines[buffers.denoise].inputs if t.name in PER_STEP_FACTORS]
        step_inputs = {t.name: [self.backend.alloc(t.concrete(batch), np.float32) for _ in plan.timesteps]
                       for t in factors}
        encoder = self._encoder(batch, coeffs[0], buffers.latents[0]) if img2img else None
        if inpaint:
            encoder = self._inpaint_encoder(batch, coeffs[0], buffers)
        conditioning = {t.name: buffers.shared[t.name] for t in self.bundle.engines[buffers.denoise].inputs
                        if t.name in buffers.shared}
        bindings = [
            self.backend.bind(buffers.denoise, batch, {
                **conditioning,
                "latents": buffers.latents[i % 2],
                "coeffs": coeffs[i],
                **({"time_embedding": embeddings[i]} if embeddings else {}),
                "noise": step_noise[i],
                "next_latents": buffers.latents[(i + 1) % 2],
                "denoised": buffers.denoised,
                **{name: per_step[i] for name, per_step in step_inputs.items()},
            })
            for i in range(plan.steps)
        ]
        first = [b for b in (encoder.binding if encoder else None, buffers.adapter, buffers.text) if b is not None]

        def launch() -> None:
            for binding in first:
                binding.run()
            for step in bindings:
                step.run()
            buffers.vae_decode.run()

        return Program(plan, step_noise, step_inputs, self.backend.capture(launch), bindings, encoder)

    def _evict(self) -> None:
        """Release the least recently used program: its graph, then its contexts, then its memory."""
        key, program = self.programs.popitem(last=False)
        self.backend.synchronize()  # nothing of it may still be queued on the device
        release(program.launch)
        encoder = program.encoder
        for binding in [*program.bindings, *([encoder.binding] if encoder else [])]:
            release(binding)
        owned = [*program.noise, *(b for per_step in program.step_inputs.values() for b in per_step)]
        if encoder:
            owned += list(encoder.inputs.values()) or [encoder.images, *encoder.noises]
        for buffer in owned:
            release(buffer)
        if not any(k.plan == key.plan for k in self.programs):  # the plan's last program: its coefficients go too
            for buffer in [*self.coeffs.pop(key.plan, []), *self.embeddings.pop(key.plan, [])]:
                release(buffer)

    def describe(self) -> list[dict[str, Any]]:
        """The programs kept, least recently used first, for a server's /ready."""
        return [{"batch": k.batch, "steps": k.plan.steps, "timesteps": k.plan.timesteps.tolist(),
                 "mode": "inpainting" if k.inpaint else "image-to-image" if k.img2img else "text-to-image",
                 "cfg": k.cfg}
                for k in list(self.programs)]  # a copy: /ready reads it while the worker runs
