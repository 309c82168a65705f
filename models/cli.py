"""The ``ssdkit`` command line.

    ssdkit generate [--model DIR|PRESET|default] [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N]
                    [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S]
                    [--repetition-penalty R] [--presence-penalty X] [--frequency-penalty X] [--stop TEXT ...]
                    [--dtype float32|bfloat16|float16] [--speculative lookup|MODEL_DIR [--draft-tokens K]]
    ssdkit eval     [--model DIR|default] --text FILE|DIR|python-stdlib:held-out|python-packages:held-out
                    [--tokenizer FILE]
                    [--encoding utf-8] [--errors strict] [--window 2048] [--batch 8] [--json F]
    ssdkit bench    [--model 130m] [--dtype float32,bfloat16] [--prefill-lengths 128,512,2048] [--json F]
                    [--train [--train-lengths 512,2048] [--train-batch 1] [--remat none,layer]]
                    [--plot roofline.png]
    ssdkit serve    [--model DIR|default] [--host 127.0.0.1] [--port 8000] [--slots N] [--max-queue M]
                    [--api-key KEY] [--prefix-cache-mb MB] [--snapshot-interval T] [--mesh ...]
                    an OpenAI-compatible HTTP server (the serve extra: pip install 'ssdkit[serve]'; docs/serving.md)
    ssdkit demo     prefill + O(1) decode of toy recurrences built on the core, with timings
    ssdkit train    --data FILE|DIR|IDS.npy [--config run.toml] [--out DIR] [--model PRESET | --init-from DIR]
                    [--arch mamba2|NAME|package.module:Class]
                    [--steps N] [--seq-len L] [--batch-size B] [--lr LR] ... (every TrainRunConfig field)

``--model DIR`` of generate and eval reads a Mamba-2 checkpoint (config.json) or a mixer's (mixer.json, as
``ssdkit train --arch`` writes it in OUT/model): both generate (speculatively too, on a mesh too) and
evaluate through the same code (``ssdkit.models.archs.family``).

The command line lives in ``models`` (the top of the import graph) because it wires models to the core.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
PRESETS = ("130m", "370m", "780m", "1.3b", "2.7b")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _enable_compilation_cache() -> None:
    import jax

    cache_dir = os.environ.get("SSDKIT_CACHE_DIR", str(Path.home() / ".cache" / "ssdkit" / "xla"))
    try:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except Exception:  # noqa: BLE001 - a cache is an optimisation, never a reason to fail
        pass


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CliError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CliError("--prompt-ids is empty")
    return ids


def load_model(spec: str | None, dtype_name: str, seed: int):
    """(params, model, checkpoint folder or None, random weights?) for ``--model``: a checkpoint folder (a
    Mamba-2's config.json, or a mixer's mixer.json as ``ssdkit train --arch`` writes it), a preset (random
    weights), or None / "default" for the shipped model. ``model`` is Mamba-2's config or the
    :class:`ssdkit.MixerLM` (``ssdkit.models.archs.family`` tells them apart)."""
    import jax
    import jax.numpy as jnp

    from ssdkit.models import archs, mamba2
    from ssdkit.tensor_files import CheckpointError

    dtype = getattr(jnp, dtype_name)
    if spec is None or spec == "default":
        try:
            spec = str(mamba2.pretrained_path())
        except ValueError as err:
            raise CliError(str(err)) from None
    path = Path(spec)
    if path.is_dir():
        if (path / archs.CHECKPOINT_CONFIG).exists():
            try:
                params, model = archs.load_checkpoint(path, dtype=dtype)
            except CheckpointError as err:
                raise CliError(str(err)) from None
            return params, model, path, False
        if not (path / "config.json").exists():
            raise CliError(f"model directory {spec} has no config.json (a Mamba-2 checkpoint) or "
                           f"{archs.CHECKPOINT_CONFIG} (a mixer's, ssdkit train --arch)")
        try:
            params, cfg = mamba2.load_checkpoint(path, dtype=dtype)
        except mamba2.CheckpointError as err:
            raise CliError(str(err)) from None
        return params, cfg, path, False
    name = spec.lower().removeprefix("state-spaces/").removeprefix("mamba2-")
    if name in PRESETS:
        cfg = mamba2.Mamba2Config.preset(name)
        params = jax.jit(mamba2.init_params, static_argnums=(0, 2))(cfg, jax.random.key(seed), dtype)
        return params, cfg, None, True
    if path.exists():
        raise CliError(f"--model {spec} is not a directory")
    raise CliError(f"--model {spec}: no such directory, and not a preset ({', '.join(PRESETS)})")


#: most --stop strings (as OpenAI's ``stop``)
MAX_STOPS = 4


#: the sampling flags of ``ssdkit generate``: their ``GenerationDefaults`` fields
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


def _library_checks(values: dict):
    """(sampler, penalties) from sampling settings, by the library's own checks; a ValueError's message names
    the flags."""
    import re

    import ssdkit

    try:
        sampler = ssdkit.make_sampler(values["temperature"], values["top_k"], values["top_p"], values["min_p"])
        penalties = ssdkit.Penalties(values["repetition_penalty"], values["presence_penalty"],
                                     values["frequency_penalty"])
    except ValueError as err:
        message = re.sub(r"\b(temperature|top_k|top_p|min_p)\b", lambda m: "--" + m[1].replace("_", "-"),
                         str(err).replace(" or None", ""))
        raise CliError(re.sub(r"\b(repetition|presence|frequency) penalty\b", r"--\1-penalty", message)) from None
    return sampler, penalties


def _given_sampling(args) -> dict:
    """The sampling flags given on the command line (those left out are None)."""
    return {field: getattr(args, field) for field in SAMPLING_FLAGS if getattr(args, field) is not None}


def _checked_sampling(args):
    """The sampling flags and ``--stop``, checked where the library checks them (``ssdkit.make_sampler``,
    ``ssdkit.Penalties``, ``StopStrings``) before any model loads; the message names the flags. The flags
    left out take the model's defaults later (:func:`_sampling`). Returns the stop strings or None."""
    from ssdkit.inference.stops import StopStrings
    from ssdkit.models.generation_config import GenerationDefaults

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    given = _given_sampling(args)
    _library_checks({**dataclasses.asdict(GenerationDefaults()), **given})
    stops = None
    if args.stop is not None:
        if len(args.stop) > MAX_STOPS:
            raise CliError(f"--stop is given at most {MAX_STOPS} times, got {len(args.stop)}")
        if "" in args.stop:
            raise CliError("--stop must be a non-empty string, got ''")
        stops = StopStrings(args.stop)
    if args.speculative is not None:  # plain decoding only: refused before any model loads
        on = [("--stop", stops is not None), ("--repetition-penalty", given.get("repetition_penalty", 1.0) != 1),
              ("--presence-penalty", given.get("presence_penalty", 0.0) != 0),
              ("--frequency-penalty", given.get("frequency_penalty", 0.0) != 0)]
        named = [f for f, yes in on if yes]
        if named:
            raise CliError(f"{', '.join(named)} {'goes' if len(named) == 1 else 'go'} with plain decoding, not "
                           f"--speculative (a verify pass scores several tokens at once)")
    return stops


def _sampling(args, path):
    """(sampler, penalties, a line saying which and whence) for ``ssdkit generate``: each flag given, else the
    model folder's ``generation_config.json`` (``ssdkit.models.generation_config``), else greedy without
    penalties (temperature 0 ignores the cuts: ``make_sampler``). With ``--speculative`` the model's default
    penalties are left out (a verify pass scores several tokens at once)."""
    from ssdkit.models import generation_config

    try:
        defaults = generation_config.read(path)
    except ValueError as err:
        raise CliError(str(err)) from None
    given = _given_sampling(args)
    values = dataclasses.asdict(defaults)
    source = values.pop("source")
    values.update(given)
    dropped = ""
    if args.speculative is not None:
        if (values["repetition_penalty"], values["presence_penalty"], values["frequency_penalty"]) != (1.0, 0.0, 0.0):
            dropped = " (the model's penalties left out: --speculative)"
        values.update(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    sampler, penalties = _library_checks(values)
    where = (f"the model's {generation_config.FILE}" if source is not None else "the built-in default")
    how = generation_config.GenerationDefaults(**values).describe()
    return sampler, penalties, f"[ssdkit] sampling: {how} ({where}{', flags over it' if given else ''}){dropped}"


def _prompt_ids(args, tokenizer, cfg) -> list[int]:
    """The prompt's token ids, from ``--prompt`` (through the model's tokenizer) or ``--prompt-ids``, each
    below the model's vocabulary (checked before anything compiles). Without either, the start of a new
    document: ``<|endoftext|>`` alone, when the tokenizer has it (the model writes a file from its start)."""
    from ssdkit.models import archs, text

    if args.prompt is None and args.prompt_ids is None:
        eod = text.eod_id(tokenizer) if tokenizer is not None else None
        if eod is None:
            why = "no tokenizer.json" if tokenizer is None else "a tokenizer without <|endoftext|>"
            raise CliError(f"give a prompt: --prompt TEXT or --prompt-ids 1,2,3 (this model has {why} to start "
                           f"a new document with)")
        ids = [eod]
    elif args.prompt is not None:
        if tokenizer is None:
            raise CliError("--prompt needs a tokenizer.json in the model directory; use --prompt-ids instead")
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise CliError("--prompt encodes to no tokens")
    else:
        ids = _parse_ids(args.prompt_ids)
    vocab = archs.family(cfg).vocab_size(cfg)
    bad = [i for i in ids if not 0 <= i < vocab]  # before anything compiles
    if bad:
        raise CliError(f"prompt token id {bad[0]} is out of range 0..{vocab - 1}")
    return ids


def _on_mesh(args, params, cfg, ids):
    """``--mesh``: (params split over it by the model's rules, the prompt right-padded to split over its seq
    axis, lengths or None, the context to run under). The cache's placement is left to the compiler."""
    import jax
    import jax.numpy as jnp

    from ssdkit import sharding
    from ssdkit.models import archs

    prompt = jnp.asarray([ids], jnp.int32)
    if args.mesh is None:
        return params, prompt, None, contextlib.nullcontext()
    family = archs.family(cfg)
    try:
        mesh = sharding.make_mesh(args.mesh)
        family.check_mesh(cfg, mesh)
    except ValueError as err:
        raise CliError(f"--mesh: {err}") from None
    params = sharding.place(params, mesh, family.param_specs(params, cfg, mesh))
    # right padding is exact (lengths): the prompt splits into equal pieces over seq, each at least as long
    # as the convs' past inputs (K - 1), which a piece takes from the one before it
    pieces, lengths = mesh.shape["seq"], None
    padded = pieces * max(-(-len(ids) // pieces), family.conv_kernel(cfg) - 1 if pieces > 1 else 1)
    if padded != len(ids):
        prompt = jnp.pad(prompt, ((0, 0), (0, padded - len(ids))))
        lengths = jnp.asarray([len(ids)], jnp.int32)
    print(f"[ssdkit] mesh {dict(mesh.shape)} over {mesh.size} devices", file=sys.stderr)
    return params, prompt, lengths, jax.set_mesh(mesh)


def cmd_generate(args) -> int:
    import jax

    import ssdkit
    from ssdkit.bench import compile_clock
    from ssdkit.models import archs, mamba2, text

    stops = _checked_sampling(args)
    if not -(2**63) <= args.seed < 2**63:  # jax.random.key's range
        raise CliError(f"--seed must be an integer in -2**63..2**63-1, got {args.seed}")
    if args.draft_tokens is not None and args.speculative is None:
        raise CliError("--draft-tokens goes with --speculative lookup|MODEL_DIR")
    if args.speculative is not None:  # the library's check of the draft length, before any model loads
        try:
            ssdkit.Speculative(draft_tokens=_draft_tokens(args))
        except ValueError as err:
            raise CliError(str(err).replace("Speculative.draft_tokens", "--draft-tokens")) from None
    _initialize_distributed(args)
    _enable_compilation_cache()
    params, cfg, path, random_init = load_model(args.model, args.dtype, args.seed)
    tokenizer = None if path is None else mamba2.load_tokenizer(path)
    ids = _prompt_ids(args, tokenizer, cfg)
    sampler, penalties, sampling_line = _sampling(args, path)
    if random_init:
        print(f"[ssdkit] {args.model}: randomly initialised weights (no checkpoint given)", file=sys.stderr)
    params, prompt, lengths, on_mesh = _on_mesh(args, params, cfg, ids)
    eos = text.eod_id(tokenizer) if tokenizer is not None else None
    out = sys.stdout if jax.process_index() == 0 else open(os.devnull, "w")  # noqa: SIM115 - one per process
    if args.speculative is not None:
        return _generate_speculative(args, params, cfg, prompt, lengths, on_mesh, tokenizer, eos, out, sampler,
                                     sampling_line)
    print(sampling_line, file=sys.stderr)  # once every check has passed: an error stays one line
    t0 = time.perf_counter()
    stream = ssdkit.generate_stream(
        archs.family(cfg).language_model(cfg), params, prompt, max_new_tokens=args.max_new_tokens,
        sampler=sampler, eos_token_id=eos, key=jax.random.key(args.seed), prompt_lengths=lengths,
        penalties=penalties,
    )
    stamps: list[float] = []
    compiling: list[float] = []  # seconds spent compiling by each stamp
    decoder = text.StreamDecoder(tokenizer) if tokenizer is not None else None
    if args.prompt is not None:
        out.write(args.prompt)
    stopped = False
    with on_mesh, compile_clock() as compiled_for:
        for tokens in stream:
            tok = _first_row(tokens)
            stamps.append(time.perf_counter() - t0)
            compiling.append(compiled_for())
            piece = decoder.push(tok) if decoder is not None else f"{tok} "
            if stops is not None:  # shows only text that cannot be part of a stop string
                piece, stopped = stops.push(piece)
            out.write(piece)
            out.flush()
            if stopped or (eos is not None and tok == eos):
                break
    if stops is not None:
        out.write(stops.flush())  # what was held back, if no stop string came
    out.write("\n")
    # The stream compiles its two programs (prefill + sample, decode step + sample) before the first token; the
    # rate counts the decode steps after it, less any compilation after it.
    decoding = stamps[-1] - stamps[0] - (compiling[-1] - compiling[0])
    rate = f"{(len(stamps) - 1) / max(decoding, 1e-9):.1f} tokens/s after it" if len(stamps) > 1 else "no decode step"
    ended = " (a --stop string ended them)" if stopped else ""
    print(f"[ssdkit] {len(stamps)} tokens{ended}; compiling {compiling[-1]:.2f} s (ahead of the first token, the "
          f"prefill and decode programs); first token after {stamps[0]:.2f} s, compiling included; {rate}",
          file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    """``ssdkit serve``: load the model, build the engine and the app, compile every program, then serve."""
    try:
        from ssdkit.models import server
    except ImportError as err:
        raise CliError(f"ssdkit serve needs the serve extra ({err.name} is missing): pip install 'ssdkit[serve]'") \
            from None
    import jax

    from ssdkit.inference.engine import Engine, EngineConfig
    from ssdkit.models import archs, generation_config, mamba2, text

    if not 0 <= args.port < 65536:
        raise CliError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SSDKIT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise CliError("--api-key is empty")
    if args.prefix_cache_mb < 0:
        raise CliError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got {args.prefix_cache_mb}")
    if args.drain_timeout < 0:
        raise CliError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if args.max_body_kb < 1:
        raise CliError(f"--max-body-kb must be >= 1, got {args.max_body_kb}")
    try:
        config = EngineConfig(slots=args.slots, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                              max_new_tokens=args.max_tokens_limit, snapshot_interval=args.snapshot_interval,
                              prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    except ValueError as err:
        flag = str(err).split()[0].removeprefix("EngineConfig.")
        names = {"slots": "--slots", "max_queue": "--max-queue", "max_prompt_tokens": "--max-prompt-tokens",
                 "max_new_tokens": "--max-tokens-limit", "snapshot_interval": "--snapshot-interval"}
        raise CliError(str(err).replace(f"EngineConfig.{flag}", names.get(flag, flag))) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"[ssdkit] warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    _enable_compilation_cache()
    params, cfg, path, random_init = load_model(args.model, args.dtype, args.seed)
    if random_init:
        print(f"[ssdkit] {args.model}: randomly initialised weights (no checkpoint given)", file=sys.stderr)
    tokenizer = None if path is None else mamba2.load_tokenizer(path)
    family = archs.family(cfg)
    mesh = None
    if args.mesh is not None:
        from ssdkit import sharding

        try:
            mesh = sharding.make_mesh(args.mesh)
            family.check_mesh(cfg, mesh)
        except ValueError as err:
            raise CliError(f"--mesh: {err}") from None
        if mesh.shape["seq"] > 1:
            raise CliError(f"--mesh: the server splits no sequence over devices (seq={mesh.shape['seq']}); use "
                           "data (slots split over replicas), fsdp and model")
        params = sharding.place(params, mesh, family.param_specs(params, cfg, mesh))
        print(f"[ssdkit] mesh {dict(mesh.shape)} over {mesh.size} devices", file=sys.stderr)
    engine = Engine(family.language_model(cfg), params, config, mesh=mesh, vocab_size=family.vocab_size(cfg),
                    eos_token_id=text.eod_id(tokenizer) if tokenizer is not None else None)
    template, specials = server.chat_template(path)
    name = args.served_model_name or (path.name if path is not None and args.model not in (None, "default")
                                      else args.model if random_init else "ssdkit-default")
    try:
        sampling = generation_config.read(path)
    except ValueError as err:
        raise CliError(str(err)) from None
    if sampling.source is not None:
        print(f"[ssdkit] requests that leave sampling out: {sampling.describe()} (the model's "
              f"{generation_config.FILE})", file=sys.stderr)
    srv = server.Server(engine, tokenizer, server.ServerConfig(
        model_name=name, api_key=api_key, max_body_bytes=args.max_body_kb * 1024, drain_timeout=args.drain_timeout,
        sampling=sampling if sampling.source is not None else generation_config.OPENAI),
        chat_template=template, special_tokens=specials)
    print(f"[ssdkit] compiling (prefill pieces of {', '.join(map(str, config.buckets))} tokens, admit, decode "
          f"of {config.slots} slots) ...", file=sys.stderr)
    print(f"[ssdkit] compiled in {engine.warmup():.1f} s; serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"on {jax.devices()[0].platform}", file=sys.stderr)
    server.run(srv, args.host, args.port, log_level=args.log_level)
    return 0


def _generate_speculative(args, params, cfg, prompt, lengths, on_mesh, tokenizer, eos, out, sampler,
                          sampling_line: str) -> int:
    """``generate --speculative``: the generation program compiled ahead (``ssdkit.lower_generate``), then run
    once; the text, the acceptance rate, the compile time and the generation's time apart. A draft model may be
    of either family (a Mamba-2 or a mixer checkpoint) with the model's vocabulary."""
    import jax

    import ssdkit
    from ssdkit.models import archs, text

    k = _draft_tokens(args)
    draft_params = None
    if args.speculative == "lookup":
        draft = ssdkit.PromptLookup()
    else:
        try:
            draft_params, draft_cfg, _, _ = load_model(args.speculative, args.dtype, args.seed)
        except CliError as err:  # name the flag that gave the folder
            message = str(err)
            raise CliError(message.replace("--model", "--speculative", 1) if message.startswith("--model")
                           else f"--speculative {args.speculative}: {message}") from None
        draft_family, family = archs.family(draft_cfg), archs.family(cfg)
        if draft_family.vocab_size(draft_cfg) != family.vocab_size(cfg):
            raise CliError(f"--speculative {args.speculative}: its vocabulary ({draft_family.vocab_size(draft_cfg)} "
                           f"ids) differs from the model's ({family.vocab_size(cfg)}); a draft model needs the same")
        draft = ssdkit.DraftModel(draft_family.language_model(draft_cfg))
    print(sampling_line, file=sys.stderr)

    with on_mesh:  # traced, compiled and run under the mesh, as ssdkit.generate would be
        t0 = time.perf_counter()
        compiled = ssdkit.lower_generate(
            archs.family(cfg).language_model(cfg), params, prompt, max_new_tokens=args.max_new_tokens,
            sampler=sampler, eos_token_id=eos, prompt_lengths=lengths, key=jax.random.key(args.seed),
            speculative=ssdkit.Speculative(draft, draft_tokens=k), draft_params=draft_params,
        ).compile()  # tracing includes the round costs' estimate
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = compiled()  # the one run: prefill and generation
        jax.block_until_ready(res.tokens)
        seconds = time.perf_counter() - t0
    n = int(_on_host(res.lengths)[0])
    ids = [int(t) for t in _on_host(res.tokens)[0, :n]]
    if tokenizer is not None:
        decoder = text.StreamDecoder(tokenizer)
        body = "".join(decoder.push(t) for t in ids)
    else:
        body = "".join(f"{t} " for t in ids)
    out.write((args.prompt or "") + body + "\n")
    stats = res.speculation  # one row, wherever its shards live
    drafted, accepted = (int(_on_host(a)[0]) for a in (stats.drafted, stats.accepted))
    passes = int(_on_host(stats.passes)) + 1
    print(f"[ssdkit] {n} tokens; speculative ({args.speculative}, up to {k} drafts a round): "
          f"{accepted / max(drafted, 1):.0%} of {drafted} drafted tokens accepted, "
          f"{n / passes:.2f} tokens per weight pass ({passes} passes, prefill included); compiling {compile_s:.2f} s "
          f"(ahead, once); generation {seconds * 1e3:.0f} ms, {n / seconds:.1f} tokens/s with the prefill",
          file=sys.stderr)
    return 0


def _draft_tokens(args) -> int:
    """``--draft-tokens``, or its default."""
    return 8 if args.draft_tokens is None else args.draft_tokens


def _first_row(tokens) -> int:
    """Row 0 of a step's tokens, wherever its shards live (on several processes every one gets it)."""
    return int(_on_host(tokens)[0])


def _on_host(array):
    """The whole ``array`` on this host, wherever its shards live (on several processes every one gets it)."""
    if getattr(array, "is_fully_addressable", True):
        return array
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True)


def _initialize_distributed(args) -> None:
    """``--distributed``: join the job's other processes (``jax.distributed.initialize()``, which reads
    SLURM, Open MPI, TPU pod or ``JAX_COORDINATOR_ADDRESS``-style settings) before touching any device."""
    if getattr(args, "distributed", False):
        import jax

        jax.distributed.initialize()


def cmd_eval(args) -> int:
    import json

    from ssdkit.bench import compile_clock
    from ssdkit.models import evaluation, mamba2, text

    if args.window < 1 or args.batch < 1:
        raise CliError(f"--window and --batch must be >= 1, got {args.window} and {args.batch}")
    try:
        text.check_decoding(args.encoding, args.errors)
    except ValueError as err:
        raise CliError(str(err).replace("encoding must", "--encoding must").replace("errors must", "--errors must")
                       ) from None
    try:
        files = evaluation.text_files(args.text, log=lambda line: print(f"[ssdkit] {line}", file=sys.stderr))
    except ValueError as err:
        raise CliError(str(err)) from None
    _enable_compilation_cache()
    params, cfg, path, random_init = load_model(args.model, args.dtype, 0)
    try:
        if args.tokenizer is not None:
            tokenizer, _ = text.load(args.tokenizer)
        else:
            tokenizer = mamba2.load_tokenizer(path) if path is not None else None
            if tokenizer is None:
                raise CliError(f"--model {args.model} has no tokenizer.json: give one with --tokenizer")
        docs = evaluation.read_documents(files, tokenizer, encoding=args.encoding, errors=args.errors)
    except ValueError as err:
        raise CliError(str(err)) from None
    if random_init:
        print(f"[ssdkit] {args.model}: randomly initialised weights (no checkpoint given)", file=sys.stderr)
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc=f"eval ({len(files)} files)", dynamic_ncols=True,
                   file=sys.stderr)
    try:
        with compile_clock() as compiled_for:
            result = evaluation.evaluate(params, cfg, docs, window=args.window, batch=args.batch,
                                         progress=bar.update if bar is not None else None)
            compiling = compiled_for()
    except ValueError as err:
        raise CliError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    running = max(result.seconds - compiling, 1e-9)
    print(f"{result.documents} files, {result.num_bytes:,} bytes, {result.tokens:,} target tokens: "
          f"cross-entropy {result.cross_entropy:.4f} nats/token, perplexity {result.perplexity:.3f}, "
          f"{result.bits_per_byte:.4f} bits/byte ({result.tokens / running:,.0f} tokens/s; {result.seconds:.1f} s, "
          f"of which compiling {compiling:.1f} s)")
    if args.json:
        record = {"model": str(path) if path is not None else args.model, "text": str(args.text),
                  **dataclasses.asdict(result), "compile_seconds": compiling, "cross_entropy": result.cross_entropy,
                  "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    """Prefill + decode of the toy recurrences on the core primitives, with timings."""
    import jax
    import jax.numpy as jnp

    from ssdkit import Greedy, LMConfig, MixerLM, generate
    from ssdkit.models.toy import GLA, Retention

    _positive_ints("--prompt-len", args.prompt_len)
    _positive_ints("--max-new-tokens", args.max_new_tokens)
    _enable_compilation_cache()
    for name, mixer, conv in (("retention (scalar decay)", Retention(), 1), ("GLA (diagonal decay)", GLA(), 4)):
        cfg = LMConfig(vocab_size=256, d_model=128, n_layer=4, num_heads=4, head_dim=32, state_dim=32,
                        chunk_size=64, conv_kernel=conv)
        model = MixerLM(cfg, mixer)
        params = model.init(jax.random.key(args.seed))
        prompt = jax.random.randint(jax.random.key(1), (1, args.prompt_len), 0, cfg.vocab_size, jnp.int32)
        prefill = jax.jit(model.prefill)
        t = time.perf_counter()
        jax.block_until_ready(prefill(params, prompt))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(prefill(params, prompt))
        prefill_s = time.perf_counter() - t
        res = generate(model, params, prompt, max_new_tokens=args.max_new_tokens, sampler=Greedy())
        jax.block_until_ready(res.tokens)
        t = time.perf_counter()
        res = generate(model, params, prompt, max_new_tokens=args.max_new_tokens, sampler=Greedy())
        jax.block_until_ready(res.tokens)
        gen_s = time.perf_counter() - t
        print(f"{name}: prefill {args.prompt_len} tokens in {prefill_s * 1e3:.1f} ms "
              f"({args.prompt_len / prefill_s:,.0f} tokens/s; compile {compile_s:.2f} s); "
              f"generate {args.max_new_tokens} tokens in one device call: {gen_s * 1e3:.1f} ms "
              f"({args.max_new_tokens / gen_s:,.0f} tokens/s)")
        print(f"  first generated ids: {res.tokens[0, :12].tolist()}")
    return 0


def _positive_ints(flag: str, value: str | int) -> None:
    """``value`` (an int, or comma-separated ints) holds only ints >= 1: else a CliError naming ``flag``."""
    items = [value] if isinstance(value, int) else value.split(",")
    try:
        ok = bool(items) and all(int(v) >= 1 for v in items)
    except ValueError:
        ok = False
    if not ok:
        raise CliError(f"{flag} must be {'an int' if isinstance(value, int) else 'comma-separated ints'} >= 1, "
                       f"got {value!r}")


def cmd_bench(args) -> int:
    from ssdkit.models import bench

    for flag in ("prefill_lengths", "prefill_batch", "decode_batches", "decode_steps", "repeats", "train_lengths",
                 "train_batch", "scan_shape"):
        _positive_ints("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.scan and len(args.scan_shape.split(",")) != 4:
        raise CliError(f"--scan-shape must be four ints H,P,N,T, got {args.scan_shape!r}")
    if args.dtype is None:
        args.dtype = "auto" if args.train else "float32,bfloat16"
    if args.train:
        from ssdkit.models.training import COMPUTE_DTYPES as allowed
    else:
        allowed = DTYPES
    if bad := [d for d in args.dtype.split(",") if d not in allowed]:
        raise CliError(f"--dtype {bad[0]!r} is not one of {', '.join(allowed)}" + (" (with --train)" if args.train
                                                                                   else ""))
    if args.plot:  # before minutes of measuring
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            from ssdkit.bench import BENCH_EXTRA_HINT

            raise CliError(f"--plot needs matplotlib: {BENCH_EXTRA_HINT}")
    if args.train:
        from ssdkit.core.layers import REMAT_POLICIES

        if bad := [r for r in args.remat.split(",") if r not in REMAT_POLICIES]:
            raise CliError(f"--remat {bad[0]!r} is not one of {', '.join(REMAT_POLICIES)}")
    if not Path(args.model).is_dir():
        try:
            bench.model_config(args.model)
        except ValueError as err:
            raise CliError(str(err)) from None
    _enable_compilation_cache()
    return bench.main(args)


def cmd_train(args) -> int:
    from ssdkit.models import training

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(training.TrainRunConfig)
             if getattr(args, f.name, None) is not None}
    try:
        options = training.TrainRunConfig.from_file(args.config) if args.config else {}
        options.update(given)
        cfg = training.TrainRunConfig.from_dict(options, source=args.config)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from None
    _initialize_distributed(args)
    _enable_compilation_cache()
    try:
        training.train(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise CliError(str(err)) from None
    return 0


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    """One flag per TrainRunConfig field (``--seq-len`` for ``seq_len``), grouped, with its line of
    ``training.HELP``; unset flags keep the config file's value, then the field's default."""

    from ssdkit.models.training import HELP, TrainRunConfig

    groups = {name: t.add_argument_group(name) for name in ("data", "model", "optimiser", "run", "mesh")}
    groups["run"].add_argument("--config", default=None,
                               help="a .toml or .json file with the same option names (flags given here win)")
    for f in dataclasses.fields(TrainRunConfig):
        group, text = HELP[f.name]
        if f.default is dataclasses.MISSING:
            text += " (required, here or in --config)"
        elif f.default is not None:
            text += f" (default {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            groups[group].add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                       help=text)
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        groups[group].add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=text)


TRAIN_EXAMPLES = """examples:
  a first run, about a minute on 2 cores (a small model on the Python standard library):
    ssdkit train --data python-stdlib --out runs/first --steps 60 --d-model 64 --n-layer 2 \
        --seq-len 256 --batch-size 4 --eval-every 30
  the shipped model's recipe, about 80 minutes on 2 cores (resumable: rerun the same command):
    ssdkit train --config configs/mamba2-python-bpe.toml
"""


def _add_distributed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host job: call jax.distributed.initialize() first, then run the "
                        "same command on every host (docs/scaling.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssdkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a checkpoint directory (Mamba-2, or any mixer "
                       "`ssdkit train --arch` trained) or a Mamba-2 preset")
    g.add_argument("--model", default=None, help="checkpoint directory (a Mamba-2's config.json, or a mixer's "
                   "mixer.json), a Mamba-2 preset (random weights: " + ", ".join(PRESETS)
                   + "), or default: the shipped model (the default)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt (needs tokenizer.json in the model directory); without a "
                     "prompt, the model starts a new document")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate after the prompt (default 200)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy. Every sampling flag left out takes "
                   "the model folder's generation_config.json (the shipped model's: see its card), else greedy "
                   "decoding without penalties")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only")
    g.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p, in (0, 1]")
    g.add_argument("--min-p", type=float, default=None, help="sample only tokens at least p times as likely as the "
                   "likeliest, p in [0, 1]")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide the positive logits of tokens in the prompt or the output so far by R, multiply the "
                   "others by R; R > 0 (1: off)")
    g.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="subtract X from the logit of every token generated so far (0: off)")
    g.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="subtract X from a token's logit per time it was generated so far (0: off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help=f"stop at the first occurrence of TEXT in the generated text, not printing it; up to "
                   f"{MAX_STOPS} times (without a tokenizer the text is the printed ids, 'ID ' each). Like the "
                   f"penalties, for plain decoding only (not --speculative)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (state stays float32)")
    g.add_argument("--speculative", default=None, metavar="lookup|MODEL_DIR",
                   help="decode speculatively: drafts from prompt lookup (n-grams of the prompt and the text so "
                   "far) or from a smaller draft model with the same vocabulary; same tokens as greedy, same "
                   "distribution as sampling (docs/pattern.md)")
    g.add_argument("--draft-tokens", type=int, default=None, help="with --speculative: most drafts a round (8)")
    g.add_argument("--mesh", default=None, help="shard over the devices, e.g. fsdp=8 or fsdp=4,seq=2 "
                   "(docs/scaling.md)")
    _add_distributed_flag(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="prefill/decode throughput with roofline accounting (see docs/benchmarks.md)")
    b.add_argument("--model", default="130m", help="checkpoint directory, preset, or Mamba2Config fields "
                   "key=value,... (random weights), e.g. d_model=256,n_layer=6,vocab_size=256")
    b.add_argument("--dtype", default=None,
                   help="comma-separated weight dtypes (default float32,bfloat16); with --train: compute dtypes, "
                        "auto (default: as `ssdkit train` resolves it), float32 or bfloat16; master weights stay "
                        "float32")
    b.add_argument("--train", action="store_true", help="time the training step of `ssdkit train` instead")
    b.add_argument("--scan", action="store_true", help="time the recurrence's transition kinds side by side instead "
                   "(scalar, diagonal, and each with the delta rule's rank-one term): prefill, train step, decode")
    b.add_argument("--scan-shape", default="8,128,128,4096", help="with --scan: heads, head_dim P, state_dim N, "
                   "tokens T (default 8,128,128,4096)")
    b.add_argument("--train-lengths", default="512,2048", help="with --train: tokens per row")
    b.add_argument("--train-batch", type=int, default=1, help="with --train: rows per step")
    b.add_argument("--remat", default="layer",
                   help="with --train: comma-separated remat policies: none, layer (ssdkit train's default), "
                        "matmuls")
    b.add_argument("--prefill-lengths", default="128,512,2048",
                   help="comma-separated prompt lengths, in tokens, to time prefill at (default 128,512,2048)")
    b.add_argument("--prefill-batch", type=int, default=1, help="rows per prefill (default 1)")
    b.add_argument("--decode-batches", default="1,16", help="comma-separated batch sizes to time decoding at "
                   "(default 1,16)")
    b.add_argument("--decode-steps", type=int, default=32, help="decode steps per timed run (default 32)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per case; the median is reported (default 5)")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--plot", default=None, help="also write a roofline PNG here (needs matplotlib: the bench extra)")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="cross-entropy, perplexity and bits per byte over text files")
    e.add_argument("--model", default=None, help="checkpoint directory (Mamba-2, or a mixer's from "
                   "`ssdkit train --arch`), or default: the shipped model (default)")
    e.add_argument("--text", required=True,
                   help="a text file, a folder (every text file, each a document; files with a NUL byte in their "
                        "first 8 KiB are skipped), or a named corpus's part: python-stdlib:held-out, "
                        "python-packages:held-out (installed packages never trained on), python-code:held-out")
    e.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model directory's)")
    e.add_argument("--encoding", default="utf-8",
                   help="how files are decoded for a text tokenizer (default utf-8; e.g. latin-1, cp1252); "
                        "a byte-level model reads the bytes as they are")
    e.add_argument("--errors", default="strict",
                   help="undecodable bytes for a text tokenizer: strict (default) refuses the file, naming the "
                        "byte offset; replace, ignore, backslashreplace decode anyway")
    e.add_argument("--window", type=int, default=2048, help="tokens per window (the result does not depend on it)")
    e.add_argument("--batch", type=int, default=8, help="rows of documents read side by side")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar on stderr (default on)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: continuous batching over state slots, an "
                       "exact prefix cache of recurrent states (the serve extra; docs/serving.md)")
    v.add_argument("--model", default=None, help="checkpoint directory (Mamba-2 or a mixer's), a Mamba-2 preset "
                   "(random weights), or default: the shipped model (the default)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--slots", type=int, default=8, help="requests decoded together: the batch of the compiled "
                   "decode step (default 8)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; past it, 429 (default 64)")
    v.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (default: "
                   "$SSDKIT_API_KEY, else none)")
    v.add_argument("--prefix-cache-mb", type=float, default=512, help="memory for snapshots of recurrent states by "
                   "prompt prefix (default 512; 0 turns the prefix cache off)")
    v.add_argument("--snapshot-interval", type=int, default=256, help="tokens between snapshots inside a prompt, "
                   "and the longest prefill piece (default 256)")
    v.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted (default 8192)")
    v.add_argument("--max-tokens-limit", type=int, default=4096, help="most tokens a request may ask for "
                   "(default 4096)")
    v.add_argument("--max-body-kb", type=int, default=1024, help="largest request body (default 1024 KiB)")
    v.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds running requests get to "
                   "finish before they are cancelled (default 30)")
    v.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                   "directory's name, or ssdkit-default)")
    v.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (state stays float32)")
    v.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")
    v.add_argument("--mesh", default=None, help="shard over the devices, e.g. fsdp=8 or model=2 (docs/scaling.md)")
    v.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
    v.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="prefill + decode of toy recurrences on the core, with timings")
    d.add_argument("--prompt-len", type=int, default=512, help="tokens of random prompt to prefill (default 512)")
    d.add_argument("--max-new-tokens", type=int, default=64, help="tokens to decode after it (default 64)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train Mamba-2 (or any mixer: --arch) on a text file, a folder of text files "
                       "or a .npy of ids",
                       description="Train Mamba-2 (or a shipped mixer, or your own: --arch package.module:Class) into "
                                   "--out; the same command resumes a stopped run.", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_flags(t)
    _add_distributed_flag(t)
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        print(f"ssdkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line (what ssdkit train saved, if it says), the shell's 130
        print(f"ssdkit {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
