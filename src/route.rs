//! The one route: a request path becomes a typed status request, or a reason it is not one.

use std::fmt;

/// The two published versions of the status route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiVersion {
    V3,
    V2026_03,
}

impl ApiVersion {
    /// The path segment HubSpot uses for this version.
    pub fn segment(self) -> &'static str {
        match self {
            ApiVersion::V3 => "v3",
            ApiVersion::V2026_03 => "2026-03",
        }
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

/// A request for the status of one import task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusRequest {
    pub version: ApiVersion,
    pub task_id: TaskId,
}

impl StatusRequest {
    /// The path to ask HubSpot for.
    pub fn upstream_path(&self) -> String {
        format!(
            "/files/{}/files/import-from-url/async/tasks/{}/status",
            self.version.segment(),
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
    let rest = raw_path
        .strip_prefix("/files/")
        .ok_or(RouteError::NotFound)?;
    let (version, rest) = rest.split_once('/').ok_or(RouteError::NotFound)?;
    let version = match version {
        "v3" => ApiVersion::V3,
        "2026-03" => ApiVersion::V2026_03,
        _ => return Err(RouteError::NotFound),
    };
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
    let decoded = percent_encoding::percent_decode_str(raw_id)
        .decode_utf8()
        .map_err(|_| RouteError::InvalidTaskId)?;
    Ok(StatusRequest {
        version,
        task_id: TaskId::parse(&decoded)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    fn path(id: &str) -> String {
        format!("/files/v3/files/import-from-url/async/tasks/{id}/status")
    }

    #[test]
    fn both_versions_match() {
        let r = match_route(&Method::GET, &path("AAAAEZ6whGI")).expect("route");
        assert_eq!(
            (r.version, r.task_id.as_str()),
            (ApiVersion::V3, "AAAAEZ6whGI")
        );
        let p = "/files/2026-03/files/import-from-url/async/tasks/a.b~c_d-e/status";
        let r = match_route(&Method::HEAD, p).expect("route");
        assert_eq!(r.version, ApiVersion::V2026_03);
        assert_eq!(r.upstream_path(), p);
    }

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

    #[test]
    fn other_paths_and_methods() {
        assert_eq!(match_route(&Method::GET, "/"), Err(RouteError::NotFound));
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
