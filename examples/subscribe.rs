//! A minimal gRPC subscriber in Rust: connect to a running blink, print detections above 5 sigma.
//!
//! ```sh
//! cargo run --release -- serve --config blink.toml &   # or any running blink
//! cargo run --example subscribe -- http://127.0.0.1:50051
//! ```

use blink::proto::blink_client::BlinkClient;
use blink::proto::SubscribeRequest;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let mut client = BlinkClient::connect(addr).await?;
    let request = SubscribeRequest { min_score: 5.0, ..Default::default() };
    let mut stream = client.subscribe(request).await?.into_inner();
    while let Some(d) = stream.message().await? {
        println!(
            "#{} {} {} band {} at ({:.5}, {:.5}): score {:.1} sigma (survey SNR {:.1})",
            d.sequence, d.survey, d.alert_id, d.band, d.ra, d.dec, d.score, d.survey_snr
        );
    }
    Ok(())
}
