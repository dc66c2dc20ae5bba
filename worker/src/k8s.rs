//! The worker's own pod's `controller.kubernetes.io/pod-deletion-cost` (`--pod-deletion-cost`), so that
//! when KEDA's HPA scales the worker Deployment down the ReplicaSet removes an idle pod before a busy one
//! (deploy/k8s/README.md says why this and not a ScaledJob). The cost is [`BUSY_COST`] while the worker
//! has a job in flight and [`IDLE_COST`] otherwise; it is patched on each change only (coalesced: a patch
//! in progress is followed by one with the latest state), with a merge patch on the pod through the
//! in-cluster API (service-account token and CA, `POD_NAME` / `POD_NAMESPACE` from the downward API).
//! Best effort, as Kubernetes documents the annotation: a failed patch is logged and retried on the next
//! change; jobs stay safe through the drain on SIGTERM whichever pod is chosen.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
pub const BUSY_COST: i32 = 1000;
pub const IDLE_COST: i32 = 0;

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{0} is not set (the downward API or the in-cluster environment provides it)")]
    MissingEnv(&'static str),
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("the API answered {0}")]
    Status(u16),
}

/// Patches one pod's deletion cost.
#[derive(Debug, Clone)]
pub struct PodDeletionCost {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
}

fn env(name: &'static str) -> Result<String, KubeError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or(KubeError::MissingEnv(name))
}

impl PodDeletionCost {
    /// The pod `POD_NAMESPACE/POD_NAME` through `api` (default: the in-cluster API at
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` with the service account's CA), with
    /// the service account's token when the token file exists.
    pub fn from_env(api: Option<&str>) -> Result<Self, KubeError> {
        let (name, namespace) = (env("POD_NAME")?, env("POD_NAMESPACE")?);
        let mut builder = reqwest::Client::builder().timeout(PATCH_TIMEOUT);
        let base = match api {
            Some(api) => api.trim_end_matches('/').to_string(),
            None => {
                let host = env("KUBERNETES_SERVICE_HOST")?;
                let port = env("KUBERNETES_SERVICE_PORT")?;
                let ca_path = Path::new(SERVICE_ACCOUNT).join("ca.crt");
                let ca = std::fs::read(&ca_path)
                    .map_err(|e| KubeError::Read(ca_path.display().to_string(), e))?;
                builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&ca)?);
                format!("https://{host}:{port}")
            }
        };
        let token = std::fs::read_to_string(Path::new(SERVICE_ACCOUNT).join("token"))
            .ok()
            .map(|t| t.trim().to_string());
        Ok(PodDeletionCost {
            client: builder.build()?,
            url: format!("{base}/api/v1/namespaces/{namespace}/pods/{name}"),
            token,
        })
    }

    pub async fn set(&self, cost: i32) -> Result<(), KubeError> {
        let body = json!({"metadata": {"annotations": {ANNOTATION: cost.to_string()}}});
        let mut req = self
            .client
            .patch(&self.url)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(KubeError::Status(resp.status().as_u16()));
        }
        Ok(())
    }

    /// Follows `busy` until its sender is gone: one patch per change of state, the first at once.
    pub async fn follow(self, mut busy: watch::Receiver<bool>) {
        let mut patched: Option<bool> = None;
        loop {
            let now = *busy.borrow_and_update();
            if patched != Some(now) {
                let cost = if now { BUSY_COST } else { IDLE_COST };
                match self.set(cost).await {
                    Ok(()) => {
                        tracing::debug!(cost, "pod deletion cost set");
                        patched = Some(now);
                    }
                    Err(e) => tracing::warn!(cost, error = %e, "pod deletion cost not set"),
                }
            }
            if busy.changed().await.is_err() {
                return;
            }
        }
    }
}
