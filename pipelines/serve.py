"""Gated serving: a Ray Serve HTTP endpoint for ``models:/NAME@champion`` (or a given version).

Only a version whose evidence verifies is served (``pipelines.evidence``: its evaluation re-read,
hashed and re-judged, and the downloaded files checked against the hashes recorded when it was
gated), never on the strength of its tags. The endpoint listens on loopback by default:

    POST http://127.0.0.1:8000/generate  {"prompt": "Where was X born?", "max_new_tokens": 64}
    -> {"text": "...", "model": "NAME", "version": "3"}
"""

from __future__ import annotations

from pipelines.evidence import verify_files, verify_version
from pipelines.registry import CHAMPION

ROUTE = "/generate"


class Generator:
    """One Serve replica: the model is loaded once, answers are greedy."""

    def __init__(self, folder: str, name: str, version: str) -> None:
        from unlearn.models import load_model, load_tokenizer

        self.model, self.tokenizer = load_model(folder), load_tokenizer(folder)
        self.model.eval()
        self.name, self.version = name, version

    async def __call__(self, request) -> dict:
        from unlearn.data.tokenize import prompt_ids
        from unlearn.eval.scoring import greedy_generate

        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return {"error": "the request needs a non-empty string field 'prompt'"}
        max_new_tokens = max(1, min(int(body.get("max_new_tokens", 64)), 512))
        text, = greedy_generate(self.model, self.tokenizer, [prompt_ids(self.tokenizer, prompt)],
                                max_new_tokens=max_new_tokens)
        return {"text": text, "model": self.name, "version": self.version}


def resolve_version(client, name: str, version: str | None) -> str:
    if version is not None:
        return str(version)
    return str(client.get_model_version_by_alias(name, CHAMPION).version)


def serve_model(client, name: str, version: str | None = None, *, host: str = "127.0.0.1",
                port: int = 8000, blocking: bool = True) -> str:
    """Deploy ``name`` (its champion, or ``version``) if its evidence verifies; returns the URL."""
    from ray import serve

    from pipelines.models import download_model
    from pipelines.ray_env import ensure_ray

    version = resolve_version(client, name, version)
    evidence = verify_version(client, name, version)  # refuses before anything starts
    folder = download_model(f"models:/{name}/{version}")
    verify_files(folder, evidence)
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(Generator, name="unlearn-generator",
                           ray_actor_options={"num_cpus": 1}).bind(folder, name, version)
    serve.run(app, name="unlearn", route_prefix=ROUTE, blocking=False)
    url = f"http://{host}:{port}{ROUTE}"
    print(f"serving {name} version {version} at {url}", flush=True)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
