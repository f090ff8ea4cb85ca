"""Where the published GLM-4 files without weights lie: ../shared/models beside the repo (CI and
developers have it). Tests that use them skip when it is absent."""

from pathlib import Path

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
GLM4_CHAT_DIR = SHARED_MODELS / "glm-4-9b-chat"
