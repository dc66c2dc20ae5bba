//! Result images in S3-compatible storage (service-contract §7): aws-sdk-s3 with path-style addressing
//! against any endpoint (Garage in tests and compose; AWS S3, R2, MinIO in production), static
//! credentials, deterministic keys `{kind}/{request_id}/{i}.{ext}` (a retried job overwrites its own
//! objects instead of leaving a second set), and client URLs that are either presigned GETs signed for the
//! *public* endpoint (SigV4 signs the Host header, so the URL must be signed for the host clients use) or
//! `{public_base_url}/{key}` when the bucket is served publicly.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use crate::job::EndpointKind;

/// SigV4 presigned URLs are valid for at most 7 days.
pub const MAX_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where and how results are stored. `Debug` redacts the secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// S3 API endpoint the worker talks to, e.g. `http://127.0.0.1:3900`.
    pub endpoint: String,
    /// Endpoint clients reach (URLs are signed for its host); `None` = same as `endpoint`.
    pub public_endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub bucket: String,
    /// When set, URLs are `{public_base_url}/{key}` (bucket served publicly) instead of presigned.
    pub public_base_url: Option<String>,
    /// Lifetime of presigned URLs, at most [`MAX_URL_LIFETIME`].
    pub url_lifetime: Duration,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("endpoint", &self.endpoint)
            .field("public_endpoint", &self.public_endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("bucket", &self.bucket)
            .field("public_base_url", &self.public_base_url)
            .field("url_lifetime", &self.url_lifetime)
            .finish()
    }
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The configuration cannot work (URL lifetime over 7 days, empty bucket name). Permanent.
    #[error("storage configuration: {0}")]
    Config(String),
    /// The store could not be reached, timed out, or answered 5xx / throttling. Transient.
    #[error("storage unavailable during {op}: {detail}")]
    Unavailable { op: &'static str, detail: String },
    /// The store refused this deployment's access (missing bucket, bad credentials). Another worker, or
    /// this one once an operator fixes it, can succeed: retried within the job's delivery limit.
    #[error("storage refused {op} ({status} {code}): bucket or credentials misconfigured")]
    Misconfigured {
        op: &'static str,
        status: u16,
        code: String,
    },
    /// The store rejected the request itself (4xx other than the above). Retrying the same request fails again.
    #[error("storage rejected {op} ({status} {code})")]
    Rejected {
        op: &'static str,
        status: u16,
        code: String,
    },
    /// Building the request failed locally (presigning, invalid input). Permanent.
    #[error("storage request could not be built for {op}: {detail}")]
    Build { op: &'static str, detail: String },
}

impl StorageError {
    /// True when retrying (later, or on another worker) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Config(_) => false,
            StorageError::Unavailable { .. } => true,
            StorageError::Misconfigured { .. } => true,
            StorageError::Rejected { .. } => false,
            StorageError::Build { .. } => false,
        }
    }

    fn from_sdk<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match &err {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("unknown").to_string();
                classify_status(op, status, code)
            }
            SdkError::ResponseError(_)
            | SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_) => StorageError::Unavailable {
                op,
                detail: format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
            },
            SdkError::ConstructionFailure(_) => StorageError::Build {
                op,
                detail: format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
            },
            // SdkError is non-exhaustive: treat variants added later as transient.
            _ => StorageError::Unavailable {
                op,
                detail: format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
            },
        }
    }
}

fn classify_status(op: &'static str, status: u16, code: String) -> StorageError {
    const MISCONFIGURED: [&str; 5] = [
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AuthorizationHeaderMalformed",
    ];
    if status >= 500
        || status == 429
        || status == 408
        || code == "SlowDown"
        || code == "RequestTimeout"
    {
        StorageError::Unavailable {
            op,
            detail: format!("{status} {code}"),
        }
    } else if MISCONFIGURED.contains(&code.as_str()) || status == 401 || status == 403 {
        StorageError::Misconfigured { op, status, code }
    } else {
        StorageError::Rejected { op, status, code }
    }
}

/// One uploaded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    /// URL clients download it from (presigned or public).
    pub url: String,
    pub size: u64,
    pub content_type: String,
}

/// The deterministic key of image `index` of a request.
pub fn object_key(kind: EndpointKind, request_id: &str, index: usize, ext: &str) -> String {
    format!("{}/{request_id}/{index}.{ext}", kind.as_str())
}

/// S3 client pair: one for the API endpoint, one that only signs URLs for the public endpoint.
#[derive(Debug, Clone)]
pub struct Storage {
    client: Client,
    public: Client,
    config: StorageConfig,
}

fn client_for(config: &StorageConfig, endpoint: &str) -> Client {
    let credentials = Credentials::new(
        config.access_key_id.clone(),
        config.secret_access_key.clone(),
        None,
        None,
        "fleet-static",
    );
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(config.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        // S3-compatible stores differ in their support for the newer default checksums.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

impl Storage {
    /// Builds the clients; checks the configuration but makes no request.
    pub fn new(config: StorageConfig) -> Result<Self, StorageError> {
        if config.bucket.is_empty() {
            return Err(StorageError::Config("bucket name is empty".into()));
        }
        if config.url_lifetime > MAX_URL_LIFETIME || config.url_lifetime.is_zero() {
            return Err(StorageError::Config(format!(
                "URL lifetime {:?} must be between 1 s and 7 days",
                config.url_lifetime
            )));
        }
        let client = client_for(&config, &config.endpoint);
        let public = client_for(
            &config,
            config
                .public_endpoint
                .as_deref()
                .unwrap_or(&config.endpoint),
        );
        Ok(Storage {
            client,
            public,
            config,
        })
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// Uploads `body` under `key` and returns it with its client URL.
    pub async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<StoredObject, StorageError> {
        let size = body.len() as u64;
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| StorageError::from_sdk("put_object", e))?;
        let url = self.url_for(key).await?;
        Ok(StoredObject {
            key: key.to_string(),
            url,
            size,
            content_type: content_type.to_string(),
        })
    }

    /// The client URL of `key`: `{public_base_url}/{key}` or a presigned GET for the public endpoint.
    pub async fn url_for(&self, key: &str) -> Result<String, StorageError> {
        if let Some(base) = &self.config.public_base_url {
            return Ok(format!("{}/{key}", base.trim_end_matches('/')));
        }
        let presign = PresigningConfig::expires_in(self.config.url_lifetime)
            .map_err(|e| StorageError::Config(format!("presigning: {e}")))?;
        let request = self
            .public
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .presigned(presign)
            .await
            .map_err(|e| StorageError::from_sdk("presign get_object", e))?;
        Ok(request.uri().to_string())
    }

    /// Keys under `prefix`, sorted (tests and operators inspect what a request left).
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| StorageError::from_sdk("list_objects_v2", e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> StorageConfig {
        StorageConfig {
            endpoint: "http://127.0.0.1:3900".into(),
            public_endpoint: Some("https://images.example.com".into()),
            region: "garage".into(),
            access_key_id: "GKexample".into(),
            secret_access_key: "very-secret-value".into(),
            bucket: "fleet".into(),
            public_base_url: None,
            url_lifetime: Duration::from_secs(3600),
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let text = format!("{:?}", config());
        assert!(!text.contains("very-secret-value"), "{text}");
        assert!(
            text.contains("<redacted>") && text.contains("GKexample"),
            "{text}"
        );
    }

    #[test]
    fn keys_are_deterministic() {
        assert_eq!(
            object_key(EndpointKind::Sprint, "r1", 3, "png"),
            "sprint/r1/3.png"
        );
    }

    #[test]
    fn lifetime_is_bounded() {
        let mut c = config();
        c.url_lifetime = MAX_URL_LIFETIME + Duration::from_secs(1);
        assert!(matches!(Storage::new(c), Err(StorageError::Config(_))));
        let mut c = config();
        c.url_lifetime = MAX_URL_LIFETIME;
        assert!(Storage::new(c).is_ok());
    }

    #[tokio::test]
    async fn presigned_urls_target_the_public_host_and_public_base_urls_are_plain() {
        let storage = Storage::new(config()).expect("valid config");
        let url = storage.url_for("base/r1/0.jpeg").await.expect("presign");
        assert!(
            url.starts_with("https://images.example.com/fleet/base/r1/0.jpeg?"),
            "{url}"
        );
        assert!(
            url.contains("X-Amz-Signature=") && url.contains("X-Amz-Expires=3600"),
            "{url}"
        );
        let mut c = config();
        c.public_base_url = Some("https://cdn.example.com/fleet/".into());
        let storage = Storage::new(c).expect("valid config");
        assert_eq!(
            storage.url_for("base/r1/0.jpeg").await.unwrap(),
            "https://cdn.example.com/fleet/base/r1/0.jpeg"
        );
    }

    #[test]
    fn classification() {
        assert!(classify_status("put", 503, "ServiceUnavailable".into()).is_retryable());
        assert!(matches!(
            classify_status("put", 404, "NoSuchBucket".into()),
            StorageError::Misconfigured { .. }
        ));
        assert!(!classify_status("put", 400, "InvalidArgument".into()).is_retryable());
        assert!(classify_status("put", 429, "SlowDown".into()).is_retryable());
    }
}
