//! The one route: a request path becomes a typed status request, or a reason it is not one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The published versions of HubSpot's status route. Callers may use any of them; the
/// gateway asks HubSpot on the one `upstream.api_version` names, so a caller's version never
/// decides which HubSpot endpoint is used, nor which cache entry it shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
pub enum ApiVersion {
    /// The numbered version, supported by HubSpot until September 2027.
    #[serde(rename = "v3")]
    V3,
    /// The first dated version, and the default `upstream.api_version`.
    #[default]
    #[serde(rename = "2026-03")]
    V2026_03,
    /// The second dated version.
    #[serde(rename = "2026-09")]
    V2026_09,
}

impl ApiVersion {
    /// Every version, oldest first.
    pub const ALL: [ApiVersion; 3] = [ApiVersion::V3, ApiVersion::V2026_03, ApiVersion::V2026_09];

    /// The path segment HubSpot uses for this version.
    pub fn segment(self) -> &'static str {
        match self {
            ApiVersion::V3 => "v3",
            ApiVersion::V2026_03 => "2026-03",
            ApiVersion::V2026_09 => "2026-09",
        }
    }

    /// The version whose path segment is `segment`, if HubSpot publishes one.
    pub fn from_segment(segment: &str) -> Option<ApiVersion> {
        ApiVersion::ALL.into_iter().find(|v| v.segment() == segment)
    }
}

/// A validated taskId: 1–128 characters of `A-Z a-z 0-9 - _ . ~`, not `.` or `..`.
/// Only unreserved characters, so it can be put into an upstream path as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId(String);

impl TaskId {
    /// Validates an already percent-decoded id.
    pub fn parse(decoded: &str) -> Result<TaskId, RouteError> {
        let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if decoded.is_empty() || decoded.len() > 128 || decoded == "." || decoded == ".." {
            return Err(RouteError::InvalidTaskId);
        }
        if !decoded.bytes().all(ok_char) {
            return Err(RouteError::InvalidTaskId);
        }
        Ok(TaskId(decoded.to_owned()))
    }

    /// The id as HubSpot knows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request for the status of one import task. It holds no version: every version of the
/// route names the same task, so callers on different versions share one cache entry and one
/// HubSpot call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusRequest {
    pub task_id: TaskId,
}

impl StatusRequest {
    /// The path to ask HubSpot for, on `version` (`upstream.api_version`).
    pub fn upstream_path(&self, version: ApiVersion) -> String {
        format!(
            "/files/{}/files/import-from-url/async/tasks/{}/status",
            version.segment(),
            self.task_id
        )
    }
}

/// Why a request is not a status request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such route")]
    NotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("taskId must be 1-128 characters of A-Z a-z 0-9 - _ . ~")]
    InvalidTaskId,
}

/// Matches a method and raw (still percent-encoded) path against the status route.
pub fn match_route(method: &hyper::Method, raw_path: &str) -> Result<StatusRequest, RouteError> {
    route(method, raw_path).map(|(_, request)| request)
}

/// [`match_route`], with the version the caller used (the request holds none).
pub fn route(
    method: &hyper::Method,
    raw_path: &str,
) -> Result<(ApiVersion, StatusRequest), RouteError> {
    let rest = raw_path
        .strip_prefix("/files/")
        .ok_or(RouteError::NotFound)?;
    let (version, rest) = rest.split_once('/').ok_or(RouteError::NotFound)?;
    // Any published version is served; the request does not keep it (see `StatusRequest`).
    let version = ApiVersion::from_segment(version).ok_or(RouteError::NotFound)?;
    let rest = rest
        .strip_prefix("files/import-from-url/async/tasks/")
        .ok_or(RouteError::NotFound)?;
    let raw_id = rest.strip_suffix("/status").ok_or(RouteError::NotFound)?;
    if raw_id.contains('/') {
        return Err(RouteError::NotFound);
    }
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        return Err(RouteError::MethodNotAllowed);
    }
    // Without a `%` there is nothing to decode (the common case: ids are unreserved
    // characters); with one, exactly one decode.
    let task_id = if raw_id.contains('%') {
        let decoded = percent_encoding::percent_decode_str(raw_id)
            .decode_utf8()
            .map_err(|_| RouteError::InvalidTaskId)?;
        TaskId::parse(&decoded)?
    } else {
        TaskId::parse(raw_id)?
    };
    Ok((version, StatusRequest { task_id }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    fn path(id: &str) -> String {
        format!("/files/v3/files/import-from-url/async/tasks/{id}/status")
    }

    /// Every published version matches, to one and the same request, and the upstream path
    /// is built on the version asked for, whatever the caller used.
    #[test]
    fn every_version_matches_to_one_request() {
        let r = match_route(&Method::GET, &path("AAAAEZ6whGI")).expect("route");
        assert_eq!(r.task_id.as_str(), "AAAAEZ6whGI");
        let id = "a.b~c_d-e";
        let requests: Vec<StatusRequest> = ApiVersion::ALL
            .iter()
            .map(|v| {
                let p = format!(
                    "/files/{}/files/import-from-url/async/tasks/{id}/status",
                    v.segment()
                );
                match_route(&Method::HEAD, &p).expect("route")
            })
            .collect();
        assert!(requests.iter().all(|r| *r == requests[0]), "{requests:?}");
        for v in ApiVersion::ALL {
            assert_eq!(
                requests[0].upstream_path(v),
                format!(
                    "/files/{}/files/import-from-url/async/tasks/{id}/status",
                    v.segment()
                )
            );
            assert_eq!(ApiVersion::from_segment(v.segment()), Some(v));
        }
        assert_eq!(ApiVersion::default(), ApiVersion::V2026_03);
    }

    /// Ids that decode to anything but one safe segment are refused after exactly one decode.
    #[test]
    fn hostile_ids_are_rejected_after_one_decode() {
        let long = "a".repeat(129);
        for id in [
            "..",
            "%2e%2e",
            ".",
            "a%2Fb",
            "%00x",
            long.as_str(),
            "a%20b",
            "%252e%252e",
            "",
            "%ff",
            "%zz",
        ] {
            assert_eq!(
                match_route(&Method::GET, &path(id)),
                Err(RouteError::InvalidTaskId),
                "{id}"
            );
        }
        assert!(match_route(&Method::GET, &path(&"a".repeat(128))).is_ok());
        assert!(
            match_route(&Method::GET, &path("%41bc")).is_ok(),
            "one decode is allowed"
        );
    }

    /// Other paths, unknown versions and other methods are 404 and 405.
    #[test]
    fn other_paths_and_methods() {
        assert_eq!(match_route(&Method::GET, "/"), Err(RouteError::NotFound));
        for version in ["v4", "2026-13", "2026-3", "V3", "v1", "2025-09", ""] {
            assert_eq!(
                match_route(
                    &Method::GET,
                    &format!("/files/{version}/files/import-from-url/async/tasks/a/status")
                ),
                Err(RouteError::NotFound),
                "{version}"
            );
        }
        assert_eq!(
            match_route(&Method::GET, &path("a/b")),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            match_route(
                &Method::GET,
                "/files/v4/files/import-from-url/async/tasks/a/status"
            ),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            match_route(&Method::GET, &format!("{}/", path("a"))),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            match_route(&Method::POST, &path("a")),
            Err(RouteError::MethodNotAllowed)
        );
    }
}
