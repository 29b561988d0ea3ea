"""The secret a key's webhook deliveries are signed with (``GET /webhooks/secret``).

With API keys on, each key's deliveries are signed with a secret of its own, derived from the
operator's ``AUDIO_ANALYSIS_WEBHOOK_SECRET`` (``shared.webhooks.signing_secret``): one secret for
every tenant let a key have correctly signed bodies of its choosing delivered to another
tenant's receiver. Without keys there is one tenant, and its deliveries are signed with the
operator's secret itself, which the API never hands out.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from api.deps import PrincipalDep, SettingsDep, require_api_key
from api.errors import JobNotFound
from api.models import ERRORS
from shared.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signing_secret

router = APIRouter(prefix="/webhooks", tags=["webhooks"], dependencies=[Depends(require_api_key)], responses=ERRORS)


class WebhookSecret(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of this API key's deliveries")
    signature_header: str = SIGNATURE_HEADER
    timestamp_header: str = TIMESTAMP_HEADER
    signed: str = Field("f'{timestamp}.{body}'", description="what the signature covers")


@router.get("/secret", response_model=WebhookSecret, summary="The secret this key's webhooks are signed with")
def webhook_secret(principal: PrincipalDep, settings: SettingsDep, response: Response) -> WebhookSecret:
    if principal.owner is None:
        raise JobNotFound("this service runs without API keys: its webhooks are signed with the operator's "
                          "AUDIO_ANALYSIS_WEBHOOK_SECRET, which the API does not hand out")
    response.headers["Cache-Control"] = "no-store"  # a credential: no cache keeps it
    return WebhookSecret(secret=signing_secret(settings.webhook_secret.get_secret_value(), principal.owner))
