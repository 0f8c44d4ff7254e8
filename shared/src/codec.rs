//! The gRPC codec of our services: prost, with small initial buffers.
//!
//! tonic's default codec starts every call with an 8 KiB encode buffer and an
//! 8 KiB decode buffer. A tunnel client holds three long-lived calls (control
//! and two data streams), so on a server with 1000 idle clients those
//! buffers alone were 48 MiB (docs/benchmarks.md, fleet). Buffers still grow
//! to whatever a busy stream needs; an idle one keeps 1 KiB.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer of a call.
const BUFFER_SIZE: usize = 1024;
/// Encoded bytes gathered before tonic hands them to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec with small initial buffers, used by the generated services.
#[derive(Debug, Clone, Copy)]
pub struct TunnelCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for TunnelCodec<T, U> {
    fn default() -> Self {
        TunnelCodec(PhantomData)
    }
}

impl<T, U> Codec for TunnelCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
