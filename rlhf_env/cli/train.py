"""``rlhf-env train``: train an agent (REINFORCE, A2C, PPO, ...) on any registered env with
rl-zoo3-style YAML hyperparameters, then evaluate it."""

from __future__ import annotations

import argparse

from rlhf_env.cli._common import HelpFormatter
import time


def add_parser(subparsers) -> None:
    from rlhf_env.agents import ALGOS

    p = subparsers.add_parser(
        "train",
        help="train an agent on a Gymnasium env (hyperparameters from YAML, like rl-zoo3)",
        description="Train an agent on a registered Gymnasium environment (CartPole-v1, TextRLHF-v0, ...). "
        "Hyperparameters come from the shipped rl-zoo3-style YAML (agents/hyperparams/ALGO.yml) or --hyperparams; "
        "flags override them. Prints the mean return of a deterministic evaluation at the end (a text env: the mean "
        "return of the last training responses; with --task, held-out accuracy).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--algo", required=True, type=str.lower, choices=sorted(ALGOS), help="agent to train (any case: ppo or PPO)")
    p.add_argument("--env", default=None,
                   help="Gymnasium environment id, e.g. CartPole-v1, TextRLHF-tiny-v0, ReasoningGym-v0 (default with --task: "
                   "ReasoningGym-v0; with --model, --reward, --prompts, --dataset or --reward-funcs: TextRLHF-v0, "
                   "TextRLHF-tiny-v0 for --model tiny; required otherwise)")
    p.add_argument("--model", default=None,
                   help="language model of a text env, the env's model=: smollm2-135m, tiny, a local Hugging Face model "
                   "folder (e.g. an exported policy) or a hub id (default: the env's)")
    p.add_argument("--reward", default=None,
                   help="reward of a text env, the env's reward_model=: default, sentiment, tiny, a reward-model folder, or "
                   "FILE.py:NAME, a function (prompts, responses) -> one score per response (default: the env's; "
                   "--reward-funcs for TRL-style functions)")
    p.add_argument("--task", default=None,
                   help="verifiable task for ReasoningGym-v0: a curated name (chain_sum, chain_sum_2digit, letter_counting) or any "
                   "reasoning-gym name; its held-out accuracy is reported at the end")
    p.add_argument("--task-config", default=None, help='task generator settings as JSON, e.g. \'{"max_terms": 3}\'')
    p.add_argument("--dataset", default=None,
                   help="rows for a text env: a JSON Lines file with a \"prompt\" and any other columns (see docs/tasks.md)")
    p.add_argument("--prompts", default=None,
                   help="prompts for a text env: a .txt file (one a line) or a .jsonl file with a \"prompt\" key (default: "
                   "the env's; --dataset for rows with more columns)")
    p.add_argument("--reward-funcs", nargs="+", default=None, metavar="FUNC",
                   help="reward functions for a text env, each FILE.py:NAME or MODULE.NAME (TRL's convention: "
                   "f(prompts, completions, **columns) -> one score per completion; columns from --dataset); they replace "
                   "the env's default reward model")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per --reward-funcs function (default: 1 each)")
    p.add_argument("--env-kwargs", default=None,
                   help='extra env constructor arguments as JSON, e.g. \'{"max_new_tokens": 16, "model": "DIR"}\'')
    p.add_argument("--hyperparams", default=None, help="YAML file with an entry for ENV (default: the shipped one for ALGO)")
    p.add_argument("--timesteps", "--n-timesteps", "-n", dest="timesteps", type=int, default=None,
                   help="env steps to train (default: the YAML's n_timesteps); --n-timesteps/-n as in rl-zoo3")
    p.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: the YAML's n_envs, else 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--tensorboard-log", "-tb", default=None, help="TensorBoard root; runs go to DIR/ALGO_k (-tb as in rl-zoo3)")
    p.add_argument("--save", default=None, help="write the trained model to this .zip (what --resume needs to continue exactly)")
    p.add_argument("--save-only-model", action="store_true",
                   help="--save and checkpoints without the optimizer state (Hugging Face's save_only_model): a third of a "
                   "text agent's zip with Adam; --resume of one continues with a fresh optimizer")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="export the trained language-model policy as a Hugging Face folder (LoRA merged, tokenizer, "
                   "rlhf_env_training.json) that from_pretrained and gym.make('TextRLHF-v0', model=DIR) load")
    p.add_argument("--resume", default=None, help="continue training a model saved with --save or a checkpoint (counters, optimizer and RNG state kept)")
    p.add_argument("--vec-env", default=None, choices=["sync", "async"],
                   help="how the N envs run: async = one subprocess each (gymnasium AsyncVectorEnv), for expensive "
                   "classic envs (default: the env's own vector env, else sync)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write checkpoints DIR/ALGO_STEPS_steps.zip; Ctrl-C or SIGTERM then writes a final one and exits cleanly")
    p.add_argument("--checkpoint-freq", type=int, default=None,
                   help="vector-env steps between checkpoints (default with --checkpoint-dir: only on interrupt)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto")
    p.add_argument("--progress-bar", "--progress", "-P", dest="progress_bar", action="store_true",
                   help="show a progress bar (--progress/-P as in rl-zoo3)")
    p.add_argument("--verbose", type=int, default=1, help="0 quiet, 1 SB3's table every log interval")
    p.add_argument("--log-interval", type=int, default=None, help="rollouts between log tables (default: the algorithm's)")
    p.add_argument("--eval-episodes", type=int, default=20,
                   help="deterministic evaluation episodes after training (0: none); with --task, held-out rows scored "
                   "(greedy and 4 samples each); a text env without --task reports its last training responses instead "
                   "(rlhf-env eval judges held-out prompts)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for classic-control MLPs, where more threads only add "
                   "synchronisation; torch's choice for text envs; 0: torch's choice)")
    p.set_defaults(func=run)


def resolve_hyperparams(algo: str, env_id: str, path: str | None) -> dict:
    """The YAML entry for (algo, env); an env missing from the *shipped* file means defaults."""
    from rlhf_env.agents.hyperparams import load_hyperparams

    try:
        return load_hyperparams(algo, env_id, path)
    except (KeyError, FileNotFoundError):
        if path is not None:
            raise
        hint = ""
        if is_text_env(env_id):  # SB3's defaults are for small MLPs: lr 7e-4 / 1e-2 would wreck a language model
            from rlhf_env.agents.hyperparams import shipped_file

            hint = (f" (made for small MLPs; for a language model give --hyperparams a file with a small learning rate, "
                    f"e.g. from the TextRLHF-tiny-v0 entry of {shipped_file(algo)})")
        print(f"no shipped {algo} hyperparameters for {env_id}: using the algorithm's defaults{hint}")
        return {}


def is_text_env(env_id: str) -> bool:
    """Whether ``env_id`` is one of the package's text envs (its actions are tokens of a LM)."""
    import gymnasium as gym

    import rlhf_env  # noqa: F401  (registers the envs)

    spec = gym.envs.registration.registry.get(env_id)
    entry = str(getattr(spec, "entry_point", "") or "")
    return entry.startswith(("rlhf_env.registration:", "rlhf_env.tasks.env:", "envs.text_env:"))


def env_kwargs_of(args) -> dict:
    """The env's constructor arguments from --env-kwargs, --model, --reward, --task,
    --task-config, --dataset, --prompts, --reward-funcs and --reward-weights."""
    from rlhf_env.cli._common import json_object

    env_kwargs = json_object(args.env_kwargs, "--env-kwargs", '{"max_new_tokens": 16}') if args.env_kwargs else {}
    if args.model is not None:
        env_kwargs["model"] = args.model
    if args.reward is not None:
        if args.task is not None or args.reward_funcs is not None:
            raise ValueError(f"--reward and {'--task' if args.task is not None else '--reward-funcs'} both give the reward: "
                             "pass one of them" + (" (the task's verifier scores its answers)" if args.task is not None else ""))
        env_kwargs["reward_model"] = args.reward
    if args.task is not None:
        env_kwargs["task"] = args.task
    if args.task_config is not None:
        if args.task is None:
            raise ValueError("--task-config needs --task")
        env_kwargs["task_config"] = json_object(args.task_config, "--task-config", '{"max_terms": 3}')
    if args.dataset is not None:
        if args.task is not None:
            raise ValueError("--dataset and --task both give the rows: pass one of them")
        env_kwargs["dataset"] = args.dataset
    if args.prompts is not None:
        if args.task is not None or args.dataset is not None:
            raise ValueError(f"--prompts and {'--task' if args.task is not None else '--dataset'} both give the prompts: pass one of them")
        env_kwargs["prompts"] = args.prompts
    if args.reward_weights is not None and args.reward_funcs is None:
        raise ValueError("--reward-weights weighs --reward-funcs: pass the functions too")
    if args.reward_funcs is not None:
        if args.task is not None:
            raise ValueError("--task brings its own reward functions (the task's verifier); --reward-funcs is for --dataset or prompts")
        from rlhf_env.rewards import load_function

        env_kwargs["reward_funcs"] = [load_function(spec, "--reward-funcs") for spec in args.reward_funcs]
        if args.reward_weights is not None:
            env_kwargs["reward_weights"] = list(args.reward_weights)
    return env_kwargs


def run(args) -> int:
    import torch

    from rlhf_env.agents import ALGOS, evaluate_policy

    text_flags = (args.model, args.reward, args.prompts, args.dataset, args.reward_funcs)
    if args.env is None:
        if args.task is not None:
            args.env = "ReasoningGym-v0"
        elif any(flag is not None for flag in text_flags):
            args.env = "TextRLHF-tiny-v0" if args.model == "tiny" else "TextRLHF-v0"
        else:
            raise ValueError("--env is required (or --task, which trains on ReasoningGym-v0, or --model / --prompts / "
                             "--reward, which train on TextRLHF-v0)")
    if args.save_only_model and not (args.save or args.checkpoint_dir or args.checkpoint_freq):
        raise ValueError("--save-only-model applies to --save and checkpoints: pass --save PATH.zip or --checkpoint-dir DIR too")
    text = is_text_env(args.env)
    env_kwargs = env_kwargs_of(args)
    if env_kwargs and not text and args.vec_env is None and (args.task or any(flag is not None for flag in text_flags)):
        raise ValueError(f"--model, --reward, --task, --dataset, --prompts and --reward-funcs need a text env (TextRLHF-v0, "
                         f"ReasoningGym-v0), not {args.env}")
    threads = args.threads
    if threads is None:
        threads = 0 if text else 1
    if threads:
        torch.set_num_threads(threads)
    algo_class = ALGOS[args.algo]
    params = resolve_hyperparams(args.algo, args.env, args.hyperparams)
    env_kwargs = {**params.pop("env_kwargs", {}), **env_kwargs}  # the YAML's env arguments, --env-kwargs and --task win
    n_timesteps = int(params.pop("n_timesteps", 100_000))
    n_envs = int(params.pop("n_envs", 1))
    # a text env is trained with the language-model policy, never an MLP over token ids
    policy = params.pop("policy", "LMPolicy" if text else "MlpPolicy")
    total = args.timesteps if args.timesteps is not None else n_timesteps
    n_envs = args.n_envs if args.n_envs is not None else n_envs

    env = args.env
    if args.vec_env is not None:
        from rlhf_env.agents.vec_env import make_vec_env

        env = make_vec_env(args.env, n_envs=n_envs, vectorization_mode=args.vec_env, env_kwargs=env_kwargs)
    if args.resume:
        if isinstance(env, str):
            from rlhf_env.agents.vec_env import make_vec_env

            # the env first, with --env-kwargs: the loaded policy is built on its (fresh) actor
            env = make_vec_env(args.env, n_envs=n_envs, env_kwargs=env_kwargs)
        model = algo_class.load(args.resume, env=env, device=args.device)
        model.tensorboard_log = args.tensorboard_log
        model.verbose = args.verbose
        reset = False
        print(f"resuming {args.resume} at {model.num_timesteps} steps")
    else:
        model = algo_class(
            policy, env, n_envs=n_envs, env_kwargs=env_kwargs or None, seed=args.seed, device=args.device,
            tensorboard_log=args.tensorboard_log, verbose=args.verbose, **params,
        )
        reset = True
    learn_kwargs = dict(tb_log_name=args.algo.upper(), reset_num_timesteps=reset, progress_bar=args.progress_bar)
    if args.log_interval is not None:
        learn_kwargs["log_interval"] = args.log_interval
    if args.checkpoint_dir or args.checkpoint_freq:
        from rlhf_env.agents import CheckpointCallback

        freq = args.checkpoint_freq if args.checkpoint_freq else 2**62  # only the final checkpoint on interrupt
        learn_kwargs["callback"] = CheckpointCallback(freq, args.checkpoint_dir or "checkpoints", name_prefix=args.algo,
                                                      save_only_model=args.save_only_model)
    start, start_steps = time.perf_counter(), model.num_timesteps if args.resume else 0
    model.learn(total, **learn_kwargs)
    from rlhf_env.agents import distributed

    if not distributed.is_main_process():  # under torchrun: rank 0 saves and evaluates
        return 0
    elapsed = time.perf_counter() - start
    done = model.num_timesteps - start_steps
    print(f"trained {args.algo} on {args.env}: {done} steps in {elapsed:.1f} s"
          + (f" ({model.num_timesteps} in all)" if args.resume else ""))
    if args.save:
        model.save(args.save, save_only_model=args.save_only_model)
        print(f"saved {args.save}")
    if args.export:
        print(f"exported the policy to {model.save_pretrained(args.export)}")
    if args.eval_episodes > 0 and args.task is not None:
        from rlhf_env.tasks import accuracy_line, evaluate_task

        task_config = env_kwargs.get("task_config")
        report = evaluate_task(model, args.task, task_config, limit=args.eval_episodes, num_samples=4, progress=args.progress_bar)
        print(f"held-out accuracy: {accuracy_line(report)}")
    elif args.eval_episodes > 0 and text:
        episodes = list(model.ep_info_buffer)
        if episodes:
            # an episode's return is the response's score minus its KL penalty (what rollout/ep_rew_mean shows)
            saved = args.export or args.save
            judge = f"rlhf-env eval {saved}" if saved else "--export DIR, then rlhf-env eval DIR"
            print(f"mean return (score - KL penalty) of the last {len(episodes)} training responses: "
                  f"{sum(e['r'] for e in episodes) / len(episodes):.3f}; to judge the policy on held-out prompts: {judge}")
    elif args.eval_episodes > 0:
        mean, std = evaluate_policy(model, args.env, n_eval_episodes=args.eval_episodes, deterministic=True)
        print(f"evaluation over {args.eval_episodes} deterministic episodes: {mean:.2f} +/- {std:.2f}")
    return 0
