"""A ReAct-style agent pipeline: three decode models take turns on one growing context.

Each step asks one role (``extract``, ``compute``, ``transform``: the demo decode
models) a question over the same message list, then appends its answer and a (fake)
tool observation to that list, so every prompt extends the previous one. (The demo
models were trained on single-turn prompts: later answers are often wrong.) With
PrefillShare the shared context is prefilled once by the prefill module, whichever
model reads it next: from the second step on, ``cached_tokens`` covers the previous
step's prompt (at least all but its last token), although each step runs on another model.

    python -m pfs_sglang.launch_server            # the demo deployment, in another shell
    python examples/react_pipeline.py --url http://127.0.0.1:30000 --steps 6
"""

from __future__ import annotations

import argparse
import os
import sys

import openai

RECORD = "name: ana; city: oslo; color: green; qty: 3; price: 5; size: 2"
ROLES = (  # (decode model, its question): the tasks the demo decode models were trained on
    ("extract", "What is the city?"),
    ("compute", "What is qty plus price?"),
    ("transform", "Write the name in upper case."),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="the router's base URL")
    parser.add_argument("--steps", type=int, default=3, help="agent steps (the roles take turns)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"))

    messages = [{"role": "user", "content": f"{RECORD}\n{ROLES[0][1]}"}]
    for step in range(args.steps):
        model = ROLES[step % len(ROLES)][0]
        try:
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
        except openai.APIConnectionError as error:
            print(f"cannot reach the router at {args.url} ({error}); start one with: "
                  "python -m pfs_sglang.launch_server", file=sys.stderr)
            return 1
        answer = reply.choices[0].message.content
        usage = reply.usage
        print(f"step {step + 1} [{model}] {answer!r}: prompt_tokens {usage.prompt_tokens}, "
              f"cached_tokens {usage.prompt_tokens_details.cached_tokens}")
        # Act and observe: a real agent would call a tool here; this fake one looks the
        # record up again. Answer and observation join the context the next model reads.
        next_question = ROLES[(step + 1) % len(ROLES)][1]
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": f"Observation: {RECORD}\n{next_question}"}]
    return 0


if __name__ == "__main__":
    sys.exit(main())
