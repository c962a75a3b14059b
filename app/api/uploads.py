"""``POST /v1/uploads``: a model archive or a text file as the raw request body, capped while it streams."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, status

from secateurs.app.api.deps import ERRORS, SettingsDep
from secateurs.app.errors import JobNotFoundError, UploadTooLargeError
from secateurs.app.schemas import Upload
from secateurs.app.uploads import read_upload, save_upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Upload,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def create_upload(
    request: Request,
    settings: SettingsDep,
    kind: Annotated[Literal["model", "text"], Query(description="model: .tar/.tar.gz/.zip of an HF folder.")],
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> Upload:
    """Then use ``upload:<id>`` as a job's ``model`` (kind=model) or a text source's ``file`` (kind=text)."""
    cap = settings.max_upload_bytes
    if content_length is not None and content_length > cap:
        raise UploadTooLargeError(
            f"upload of {content_length} bytes exceeds this server's cap of {cap} bytes",
            hint="upload a smaller archive, use a hub id, or ask the operator to raise SECATEURS_MAX_UPLOAD_BYTES",
        )
    return await save_upload(request.stream(), kind, settings.uploads_dir, cap)


@router.get("/{upload_id}", response_model=Upload, responses=ERRORS)
def get_upload(upload_id: str, settings: SettingsDep) -> Upload:
    upload = read_upload(settings.uploads_dir, upload_id)
    if upload is None:
        raise JobNotFoundError(f"no upload {upload_id!r}", hint="upload with POST /v1/uploads?kind=model|text")
    return upload
