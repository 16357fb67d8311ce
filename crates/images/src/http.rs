//! The store over HTTP: the file server of FIG. 16.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::AsyncReadExt;

use crate::{ImageError, ImageList, ImageStore};

/// Read size when streaming a blob.
const CHUNK_BYTES: usize = 256 * 1024;

impl ImageStore {
    /// `GET /v1/images` -> `{"images":[entry...]}` sorted by name;
    /// `GET /v1/images/{name}` -> the entry, 404 `image_not_found`;
    /// `GET /v1/blobs/{digest}` -> the tar streamed with Content-Length,
    /// 404 `blob_not_found`, 400 `invalid_digest`.
    /// Errors are `{"error":{"code","message"}}`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/images", get(list_images))
            .route("/v1/images/{name}", get(get_image))
            .route("/v1/blobs/{digest}", get(get_blob))
            .with_state(self)
    }
}

fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, Json(body)).into_response()
}

/// The one place where an image error becomes a status code.
fn to_response(error: ImageError) -> Response {
    let (status, code) = match &error {
        ImageError::NotFound { .. } => (StatusCode::NOT_FOUND, "image_not_found"),
        ImageError::InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid_image_name"),
        ImageError::InvalidDigest { .. } => (StatusCode::BAD_REQUEST, "invalid_digest"),
        _ => {
            tracing::error!(error = %error, "image store request failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    error_response(status, code, error.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Internal(format!("a store task failed: {e}")))?
}

async fn list_images(State(store): State<Arc<ImageStore>>) -> Response {
    match blocking(move || store.list()).await {
        Ok(images) => Json(ImageList { images }).into_response(),
        Err(e) => to_response(e),
    }
}

async fn get_image(State(store): State<Arc<ImageStore>>, Path(name): Path<String>) -> Response {
    match blocking(move || store.get(&name)).await {
        Ok(entry) => Json(entry).into_response(),
        Err(e) => to_response(e),
    }
}

async fn get_blob(State(store): State<Arc<ImageStore>>, Path(digest): Path<String>) -> Response {
    let path = match store.blob_path(&digest) {
        Ok(path) => path,
        Err(e) => return to_response(e),
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return error_response(
                StatusCode::NOT_FOUND,
                "blob_not_found",
                format!(
                    "no blob {digest} in the image store at {}; look the image up again, it may have been re-added",
                    store.root().display()
                ),
            )
        }
        Err(e) => return to_response(ImageError::io(&path, e)),
    };
    let len = match file.metadata().await {
        Ok(meta) => meta.len(),
        Err(e) => return to_response(ImageError::io(&path, e)),
    };
    // Send exactly the length announced, even if the file grew meanwhile.
    let reader = file.take(len);
    let stream = futures_util::stream::try_unfold(reader, |mut reader| async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), reader)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| to_response(ImageError::Internal(e.to_string())))
}
