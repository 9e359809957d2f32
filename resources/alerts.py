"""Where alerts go, as a Dagster resource: a generic JSON webhook and/or Slack."""

import dagster as dg
from pydantic import Field

from candlestack.alerts import Target
from resources import deployment


class AlertResource(dg.ConfigurableResource):
    """Webhook URLs are credentials (Slack's path is its token): configure them with
    EnvVar so the UI shows the variable's name, never the value."""

    webhook_url: str | None = Field(None, description="generic JSON webhook (POST)")
    slack_webhook_url: str | None = Field(None, description="Slack incoming-webhook URL")
    ui_url: str | None = Field(None, description="the Dagster UI's base URL, for links")
    timeout_seconds: float = Field(10.0, gt=0, description="per POST")

    def targets(self) -> list[Target]:
        targets = []
        if self.webhook_url:
            targets.append(Target("webhook", self.webhook_url, "json"))
        if self.slack_webhook_url:
            targets.append(Target("slack", self.slack_webhook_url, "slack"))
        return targets

    @property
    def ui_base(self) -> str | None:
        return self.ui_url.rstrip("/") if self.ui_url else None

    @staticmethod
    def secrets() -> list[str]:
        """Values that must never reach a payload, whatever an error message quotes."""
        return deployment.settings.secrets()
