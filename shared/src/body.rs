//! Reading an HTTP answer's body with a bound, so a peer that streams a huge answer cannot
//! exhaust memory (the source's pages, the target's status objects).

/// The body, at most `limit` bytes; `true` when it was longer (the rest is not read).
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on 127.0.0.1 answering `body`.
    async fn serve(body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_cut_and_says_so() {
        crate::init_process();
        let url = serve(vec![b'x'; 100_000]).await;
        let response = reqwest::get(url).await.expect("answers");
        let (body, cut) = super::read_limited(response, 1000).await.expect("reads");
        assert_eq!((body.len(), cut), (1000, true));
        let url = serve(b"{\"code\":0}".to_vec()).await;
        let (body, cut) = super::read_limited(reqwest::get(url).await.expect("answers"), 1000).await.expect("reads");
        assert_eq!((body.as_slice(), cut), (b"{\"code\":0}".as_slice(), false));
    }
}
