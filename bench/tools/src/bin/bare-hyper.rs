//! The ceiling for any hyper-based proxy, for `bench/run`: a bare hyper 1.x server (HTTP/1.1
//! and h2c, hyper-util's auto builder, like the gateway) answering every request with the same
//! bytes from memory: the body of one terminal status answer, read once from a file, with
//! HubSpot's content type. No routing, no auth, no cache lookup, no metrics, no logging.
//!
//! `bare-hyper 127.0.0.1:0 body.json` binds the address (port 0: any free port) and prints
//! `bare-hyper listening on ADDR` with the address it bound, which is how `bench/run` learns it.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(body_file)) = (args.next(), args.next()) else {
        eprintln!("usage: bare-hyper LISTEN_ADDR BODY_FILE");
        std::process::exit(64);
    };
    let addr: SocketAddr = addr.parse().expect("LISTEN_ADDR is host:port");
    let body = Bytes::from(std::fs::read(&body_file).expect("BODY_FILE is readable"));
    let listener = TcpListener::bind(addr).await.expect("can listen");
    let bound = listener
        .local_addr()
        .expect("a bound socket has an address");
    eprintln!("bare-hyper listening on {bound}, {} byte body", body.len());
    let content_type = HeaderValue::from_static("application/json;charset=utf-8");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let content_type = content_type.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let mut response = Response::new(Full::new(body.clone()));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, content_type.clone());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
