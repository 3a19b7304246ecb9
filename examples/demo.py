"""The demo: one shared context, three task models, one prefill.

Starts a PrefillShare deployment on the embedded demo models (the same thing
``python -m pfs_sglang.launch_server`` does with no arguments: the unified mode, one
server holding the base and the three LoRA decode modules), sends one shared context to
every decode model through the OpenAI client, and shows each answer with how much of its
prompt the shared prefill cache served. Then stops everything.
"""

from __future__ import annotations

import openai

from pfs_sglang.launch import Deployment, Topology
from pfs_sglang.launch.topology import default_device, with_demo_models
from pfs_sglang.launch.processes import free_port

# The demo decode modules were trained on records like this one, each for its own question
# (see pfs_sglang/train/corpus.py): the context is shared, the tasks differ.
CONTEXT = "name: ana; city: oslo; color: green; qty: 3; price: 5; size: 2"
QUESTIONS = {
    "extract": "What is the city?",
    "compute": "What is qty plus price?",
    "transform": "Write the name in upper case.",
}


def main() -> None:
    topology = with_demo_models(Topology(base_model=None, port=free_port(), device=default_device()))
    print(f"starting: prefill module {topology.base_model}, decode models "
          f"{[spec.name for spec in topology.decode_models]} ...", flush=True)
    with Deployment(topology) as deployment:
        client = openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused")
        print(f"serving on {deployment.url}; models: {[m.id for m in client.models.list().data]}\n")
        print(f"shared context:\n{CONTEXT}\n")
        for model, question in QUESTIONS.items():
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=24,
                messages=[{"role": "user", "content": f"{CONTEXT}\n{question}"}],
            )
            usage = reply.usage
            print(f"[{model}] {question}\n  -> {reply.choices[0].message.content!r}\n"
                  f"  prompt {usage.prompt_tokens} tokens, {usage.prompt_tokens_details.cached_tokens} "
                  "served from the shared prefill cache")
    print("\nstopped.")


if __name__ == "__main__":
    main()
