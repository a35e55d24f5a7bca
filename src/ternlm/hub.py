"""Models in the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE): `ternlm pull`, `ternlm list`,
and `-m REPO_ID` resolving to a downloaded model.

Only the files ternlm reads are downloaded: for a safetensors release the weights, their index,
config.json, generation_config.json and the tokenizer files; for a GGUF release the one GGUF file
chosen (it holds its tokenizer and settings).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import FormatError, HubError

SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def files_to_download(repo_files: list[str], gguf: str | None = None) -> list[str]:
    """The allow-patterns for one repository, from the names of its files."""
    ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
    if gguf is not None:
        chosen = [f for f in ggufs if f == gguf or fnmatch.fnmatch(f, gguf)]
        if len(chosen) != 1:
            problem = "no GGUF file matches" if not chosen else "several GGUF files match"
            raise HubError(f"{problem} {gguf!r}; the repository has: {', '.join(ggufs) or 'no GGUF files'}")
        return chosen
    if any(f.endswith(".safetensors") for f in repo_files):
        return SAFETENSORS_FILES
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise HubError(f"the repository has several GGUF files; choose one with --gguf: {', '.join(ggufs)}")
    raise HubError("the repository has neither safetensors nor GGUF files")


def _hub_call(what: str, call, *args, **kwargs):
    """Runs one huggingface_hub call, turning its failures into a one-line HubError."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return call(*args, **kwargs)
    except GatedRepoError:
        raise HubError(f"{what}: the repository is gated; accept its terms on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repository (or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise HubError(f"{what}: cannot reach the Hugging Face Hub (offline, or HF_HUB_OFFLINE is set); "
                       f"models already downloaded are listed by ternlm list") from None
    except HfHubHTTPError as e:
        raise HubError(f"{what}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # transport errors: requests' or httpx's, depending on huggingface_hub's version
        raise HubError(f"{what}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'})") from None


def pull(repo_id: str, revision: str | None = None, gguf: str | None = None) -> Path:
    """Downloads the model files of `repo_id` into the HF cache (with progress bars) and returns the
    path `-m` would resolve to."""
    from huggingface_hub import model_info, snapshot_download

    info = _hub_call(repo_id, model_info, repo_id, revision=revision)  # one quick request: fails at once offline
    patterns = files_to_download([s.rfilename for s in info.siblings or []], gguf)
    snapshot = _hub_call(repo_id, snapshot_download, repo_id, revision=revision, allow_patterns=patterns)
    return model_in_snapshot(Path(snapshot), repo_id)


def model_in_snapshot(snapshot: Path, repo_id: str) -> Path:
    """An HF directory as it is, or the single GGUF file of a GGUF-only snapshot."""
    if (snapshot / "config.json").exists():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) > 1:
        raise FormatError(repo_id, f"the cached snapshot has several GGUF files; pass one as -m: "
                                   f"{', '.join(str(g) for g in ggufs)}")
    return ggufs[0] if ggufs else snapshot


def cached_model(repo_id: str) -> Path:
    """The local path of a model already in the HF cache, without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        raise FormatError(repo_id, "not a local path, and not in the local HF cache (download it with ternlm pull)") from None
    return model_in_snapshot(snapshot, repo_id)


@dataclass
class CachedModel:
    repo_id: str
    size_bytes: int
    files: int
    refs: list[str]          # branch or tag names pointing at a cached revision, e.g. ["main"]
    last_modified: float     # seconds since the epoch
    path: Path


def list_cached() -> tuple[Path, list[CachedModel]]:
    """The HF cache folder and the model repositories in it, largest first."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return Path(constants.HF_HUB_CACHE), []
    models = [CachedModel(repo.repo_id, repo.size_on_disk, repo.nb_files,
                          sorted(ref for revision in repo.revisions for ref in revision.refs),
                          repo.last_modified, repo.repo_path)
              for repo in cache.repos if repo.repo_type == "model"]
    return Path(constants.HF_HUB_CACHE), sorted(models, key=lambda m: -m.size_bytes)


def default_model_path() -> Path:
    """The small model shipped inside the package."""
    return Path(str(resources.files("ternlm") / "data" / "default"))


def resolve_model_path(model: str | Path | None) -> Path:
    """A local directory or GGUF file, or an HF repo id already in the local HF cache."""
    if model is None:
        path = default_model_path()
        if not (path / "config.json").exists():
            raise FormatError(path, "this build of ternlm ships no default model; pass a model path")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return cached_model(text)
    raise FormatError(path, "no such file or directory")
